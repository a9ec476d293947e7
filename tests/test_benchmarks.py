"""The benchmark harness (benchmarks/common.py): the headline ratio is the median of per-round paired ratios (ours and
the floor timed back to back, the order alternating), after a warm-up that lasts until the ratio settles. Tested on
scripted step times and on two workloads of known relative cost timed beside a busy process; no benchmark is timed
here."""

import json
import os
import subprocess
import sys

import torch

from benchmarks import common


def _scripted(monkeypatch, times: list[tuple[str, float]]):
    """Makes `run_step` return the scripted wall time of each call, checking which side was run."""
    calls = iter(times)

    def run_step(side, device):
        name, seconds = next(calls)
        assert side.step() == name, "the sides ran in an unexpected order"
        return seconds, seconds

    monkeypatch.setattr(common, "run_step", run_step)
    return common.Side(lambda: "ours"), common.Side(lambda: "floor")


def test_warm_up_lasts_until_the_ratio_settles_and_the_order_alternates(monkeypatch):
    # warm-up: ratios 3.0 (cold), 2.4, 2.02, 2.0 -> stops after the 4th (within 5% of the 3rd)
    warm = [("ours", 3.0), ("floor", 1.0), ("floor", 1.0), ("ours", 2.4), ("ours", 2.02), ("floor", 1.0),
            ("floor", 1.0), ("ours", 2.0)]  # fmt: skip
    timed = [("ours", 2.0), ("floor", 1.0), ("floor", 1.1), ("ours", 2.2), ("ours", 1.9), ("floor", 0.95)]
    ours, floor = _scripted(monkeypatch, warm + timed)
    t = common.alternate(ours, floor, torch.device("cpu"), repeats=3, warmup=2)
    assert t.warmup_rounds == 4
    assert t.ours == [2.0, 2.2, 1.9] and t.floor == [1.0, 1.1, 0.95]
    assert t.paired_ratios == [2.0, 2.0, 2.0] and t.ratio == 2.0


def test_on_the_cpu_warm_up_and_headline_use_the_cpu_clock(monkeypatch):
    """Wall seconds include time preempted by a neighbour; on the CPU both the warm-up's settling test and the
    headline compare CPU seconds. Scripted: the wall ratios swing (a neighbour), the CPU ratios are a steady 2."""
    steps = iter(
        [(3.0, 2.0), (1.0, 1.0), (1.0, 1.0), (6.0, 2.0)] + [(9.0, 2.0), (1.0, 1.0), (1.0, 1.0), (2.0, 2.0)] * 2
    )

    def run_step(side, device):
        return next(steps)

    monkeypatch.setattr(common, "run_step", run_step)
    side = common.Side(lambda: None)
    t = common.alternate(side, side, torch.device("cpu"), repeats=4, warmup=2)
    assert t.warmup_rounds == 2  # 2.0 then 2.0 on the CPU clock (wall: 3.0 then 6.0 would not have settled)
    assert t.clock == "cpu" and t.paired_ratios == [2.0, 2.0, 2.0, 2.0] and t.ratio == 2.0


def test_quick_shortens_rounds_and_warm_up_and_one_thread_is_the_default(monkeypatch):
    monkeypatch.setattr(common, "keep_freed_memory", lambda: "default")  # this process's malloc stays as it is
    threads = torch.get_num_threads()
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        args = common.parser("x").parse_args(["--quick"])
        common.setup(args)
        assert (args.repeats, args.warmup, args.max_warmup) == (common.QUICK_REPEATS, 1, common.QUICK_MAX_WARMUP)
        args = common.parser("x").parse_args(["--quick"])
        common.setup(args, repeats=15, quick_repeats=9)  # a case with long steps sets its own
        assert args.repeats == 9
        args = common.parser("x").parse_args(["--quick", "--repeats", "3"])
        common.setup(args)
        assert args.repeats == 3  # --repeats wins
        args = common.parser("x").parse_args([])
        common.setup(args)
        assert (args.repeats, args.warmup, args.max_warmup, args.threads) == (common.REPEATS, 2, common.MAX_WARMUP, 1)
        assert common.QUICK_REPEATS < common.REPEATS
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)  # setup pinned this process


def test_headline_is_the_median_of_paired_ratios_not_the_ratio_of_medians():
    """Load that comes and goes: in rounds 2 and 4 another process slowed both steps of the round 3x, in round 5 only
    the floor's step. The paired median recovers the true 1.2; the ratio of medians does not."""
    ours = [1.2, 3.6, 1.2, 3.6, 1.2, 3.6, 1.2]
    floor = [1.0, 3.0, 1.0, 3.0, 3.0, 3.0, 1.0]
    t = common.Timings(ours, floor, ours, floor)
    assert [round(r, 6) for r in t.paired_ratios] == [1.2, 1.2, 1.2, 1.2, 0.4, 1.2, 1.2]
    assert round(t.ratio, 6) == 1.2
    naive = sorted(ours)[3] / sorted(floor)[3]
    assert abs(naive - 1.2) > 0.5  # 1.2 / 3.0
    spread = t.spread
    assert round(spread["min"], 6) == 0.4 and round(spread["q1"], 6) == 1.2 and spread["relative_iqr"] == 0


def test_paired_ratio_of_known_workloads_holds_beside_a_busy_process():
    """The same matrix product repeated 2k and k times (true ratio 2), timed while CPU-bound processes spin, one per
    core: the median paired ratio stays within 15% of 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.randn(128, 128, generator=torch.Generator().manual_seed(0))
    out = torch.empty(128, 128)

    def repeated(k: int):
        def step():
            for _ in range(k):
                torch.mm(a, a, out=out)  # the same product every time: a fixed cost per repetition

        return common.Side(step)

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        # steps of ~30 and ~60 ms on an idle core: long against a scheduler time slice, so a preemption costs both
        # sides in proportion to their work
        t = common.alternate(repeated(2000), repeated(1000), torch.device("cpu"), repeats=9, warmup=2, max_warmup=3)
    finally:
        for process in busy:
            process.kill()
            process.wait()
        torch.set_num_threads(threads)
    assert t.clock == "cpu"
    assert abs(t.ratio / 2 - 1) < 0.15, (t.ratio, t.paired_ratios)


def _line(case: str, ratio: float, memory_ratio: float = 1.0) -> dict:
    return {"case": case, "ours_s": ratio, "floor_s": 1.0, "ratio": ratio, "ratio_q1": ratio, "ratio_q3": ratio,
            "bound": 1.1, "ok": ratio <= 1.1, "ours_peak_mb": 10.0 * memory_ratio, "floor_peak_mb": 10.0,
            "memory_ratio": memory_ratio, "memory_bound": 1.1, "memory_ok": memory_ratio <= 1.1, "device": "cpu",
            "torch": torch.__version__, "repeats": 5}  # fmt: skip


def test_report_compares_two_runs_case_by_case(tmp_path, capsys):
    from benchmarks import report

    def write(name, lines):
        path = tmp_path / name
        path.write_text("[bench] a log line\n" + "".join(json.dumps(line) + "\n" for line in lines))
        return str(path)

    full = write("full.jsonl", [_line("a", 1.00), _line("b", 1.30, 1.04)])
    quick = write("quick.jsonl", [_line("a", 1.04), _line("b", 1.26, 1.04)])  # +4.0%, -3.1%
    assert report.main([quick, "--against", full, "--tolerance", "0.05"]) == 0
    assert "| a | 1.040 | 1.000 | +4.0% |" in capsys.readouterr().out
    assert report.main([quick, "--against", full, "--tolerance", "0.03"]) == 1  # a is 4% off
    partial = write("partial.jsonl", [_line("a", 1.00)])
    assert report.main([partial, "--against", full]) == 1  # b missing from one run
    assert report.main([full]) == 0
    table = capsys.readouterr().out
    assert "| b | 1.300 | 1.000 | 1.300 [1.300-1.300] (≤ 1.1) MISSED |" in table


def test_standard_error_of_the_headline_from_its_rounds():
    """1.2533 · 1.4826 · MAD / √n over the median: ratios 0.9, 1.0, 1.1 have median 1.0 and MAD 0.1."""
    from benchmarks import report

    assert abs(report.standard_error({"paired_ratios": [1.1, 0.9, 1.0]}) - 1.2533 * 1.4826 * 0.1 / 3**0.5) < 1e-9
    # a heavy tail does not move it: one round 10x off changes the MAD, not by the size of the outlier
    assert report.standard_error({"paired_ratios": [1.1, 0.9, 1.0, 1.0, 10.0]}) < 0.1
    assert report.standard_error({"paired_ratios": [1.0, 1.1]}) is None and report.standard_error({}) is None


def test_every_case_prints_its_help(capsys):
    """argparse formats help strings with %: a literal percent sign in one (e.g. a tolerance) must be escaped."""
    import importlib

    import pytest

    for name in ("inference", "stage1", "anchor_selection", "stage2", "stage2_lora"):
        module = importlib.import_module(f"benchmarks.{name}")
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0, name
        assert "--warmup" in capsys.readouterr().out, name


def test_bad_flags_stop_with_one_line_before_any_model_is_built(capsys):
    import pytest

    from benchmarks import inference, run_all

    for argv in (["--repeats", "0"], ["--threads", "0"], ["--warmup", "-1"], ["--repeats", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            inference.main(argv)
        assert exit_info.value.code == 2, argv
        assert f"argument {argv[0]}: invalid integer >=" in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exit_info:
        run_all.main(["--threads", "0"])
    assert exit_info.value.code == 2
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="--device 'nosuch': not a device"):
            inference.main(["--device", "nosuch"])
    finally:
        torch.set_num_threads(threads)


def test_rounds_in_blocks_keep_alternating_and_each_block_starts_untimed(monkeypatch):
    """alternate(..., blocks=...) runs the timed rounds block by block (run_all interleaves the cases that way); every
    block, the first included, starts with one untimed round (the case may have sat idle before it), and the order
    keeps flipping across blocks."""
    warm = [("ours", 2.0), ("floor", 1.0), ("floor", 1.0), ("ours", 2.0)]  # settles after 2 rounds
    rewarm1 = [("ours", 7.0), ("floor", 1.0)]  # a cold round after the wait for block 1: not timed
    block1 = [("floor", 1.0), ("ours", 2.0), ("ours", 2.2), ("floor", 1.0)]
    rewarm2 = [("floor", 1.0), ("ours", 9.0)]  # a cold round after the pause: not timed
    block2 = [("ours", 1.8), ("floor", 1.0)]
    ours, floor = _scripted(monkeypatch, warm + rewarm1 + block1 + rewarm2 + block2)
    t = common.alternate(ours, floor, torch.device("cpu"), repeats=3, warmup=2, blocks=lambda repeats: iter([2, 1]))
    assert t.ours == [2.0, 2.2, 1.8] and t.floor == [1.0, 1.0, 1.0]
    assert t.warmup_rounds == 4 and t.blocks == 2


def test_coordinated_case_reports_ready_runs_what_it_is_sent_and_rejects_other_commands(monkeypatch):
    import functools
    import io

    import pytest

    # warm-up 2 rounds, an untimed round, block 1: 2, an untimed round, block 2: 1; the order flips every round
    pair = [("ours", 2.0), ("floor", 1.0)]
    ours, floor = _scripted(monkeypatch, (pair + pair[::-1]) * 4)
    replies = io.StringIO()
    blocks = functools.partial(
        common.coordinated_blocks, commands=io.StringIO("run 2\nrun 1\nfinish\n"), replies=replies
    )
    t = common.alternate(ours, floor, torch.device("cpu"), repeats=3, warmup=2, max_warmup=2, blocks=blocks)
    assert replies.getvalue() == "#ready 3\n#done\n#done\n"
    assert len(t.ours) == 3 and t.blocks == 2
    with pytest.raises(SystemExit, match="unexpected command 'go 2' on stdin"):
        list(common.coordinated_blocks(3, commands=io.StringIO("go 2\n"), replies=io.StringIO()))


_TINY_CASE = """
import sys, torch
from benchmarks import common
name, log = sys.argv[1], sys.argv[2]
args = common.parser("tiny").parse_args(sys.argv[3:])
device = common.setup(args, repeats=5, quick_repeats=3)
def step():
    with open(log, "a") as f:
        f.write(name)
ours, floor = common.Side(step), common.Side(step)
t = common.alternate(ours, floor, device, args.repeats, 1, 1, blocks=args.blocks)
common.emit(name, t, 2.0, 1.0, 1.0, 2.0, batch=1, note="", device=device)
"""


def test_run_all_interleaves_the_cases_in_blocks(tmp_path):
    """Two tiny cases in their own processes, 5 rounds each in 3 blocks: their timed steps take turns block by
    block (A's warm-up, B's warm-up, A untimed + 2 rounds, B untimed + 2, A untimed + 2, B untimed + 2, A untimed + 1,
    B untimed + 1),
    and each prints its result line when finished. A case that dies is reported as failed, the others go on."""
    from benchmarks import run_all

    log = tmp_path / "steps.txt"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-c", _TINY_CASE]
    cases = [run_all.Case(name, [*command, name, str(log), "--threads", "1"], env, 3) for name in "AB"]
    broken = run_all.Case("broken", [sys.executable, "-c", "raise SystemExit(3)"], env, 3)
    assert broken.failed
    results = run_all.interleave([cases[0], broken, cases[1]], 3)
    assert [r["case"] for r in results] == ["A", "B"] and [r["repeats"] for r in results] == [5, 5]
    assert [r["blocks"] for r in results] == [3, 3]
    # each round is two steps; warm-up 1 round; blocks 2, 2, 1 rounds, each after one untimed round
    expected = "AA" + "BB" + "AAAAAA" + "BBBBBB" + "AAAAAA" + "BBBBBB" + "AAAA" + "BBBB"
    assert log.read_text() == expected
    assert run_all.split(17, 3) == [6, 6, 5] and run_all.split(2, 3) == [1, 1]


def test_a_cpu_case_pins_itself_to_its_threads(tmp_path):
    """setup pins a CPU case to the last `threads` CPUs it may use (where there are more than that), so the
    scheduler does not move its thread between CPUs mid-step; the JSON line records them."""
    import pytest

    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and two CPUs")
    code = (
        "import os, torch; from benchmarks import common; "
        "args = common.parser('x').parse_args(['--device', 'cpu']); common.setup(args); "
        "print(args.pinned_cpus, sorted(os.sched_getaffinity(0)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("] [")
    last = sorted(os.sched_getaffinity(0))[-1]
    assert out == [f"[{last}", f"{last}]\n"]


def test_run_all_falls_back_to_one_case_at_a_time_when_memory_is_short(monkeypatch, tmp_path, capsys):
    """All cases alive at once need ~15 GB; with less available run_all starts each case only after the previous
    one finished (blocks 1) and says why. With enough, it starts them all and interleaves 3 blocks."""
    from benchmarks import run_all

    events = []

    class FakeCase:
        failed = False

        def __init__(self, name, command, env, blocks):
            events.append(("start", name, blocks))

    def interleave(cases, blocks):
        events.append(("interleave", len(cases), blocks))
        return []

    monkeypatch.setattr(run_all, "Case", FakeCase)
    monkeypatch.setattr(run_all, "interleave", interleave)
    monkeypatch.setattr(common, "check_memory_probe", lambda: None)
    monkeypatch.setattr(run_all, "available_memory_gb", lambda: 4.0)
    output = str(tmp_path / "bench.jsonl")
    assert run_all.main(["--only", "inference", "--output", output]) == 0
    assert events == [("start", "inference --num-classes 1000", 1), ("interleave", 1, 1),
                      ("start", "inference --num-classes 8142", 1), ("interleave", 1, 1)]  # fmt: skip
    assert "4.0 GB of memory available" in capsys.readouterr().err
    events.clear()
    monkeypatch.setattr(run_all, "available_memory_gb", lambda: 64.0)
    assert run_all.main(["--only", "inference", "--output", output]) == 0
    assert [e[0] for e in events] == ["start", "start", "interleave"] and events[-1] == ("interleave", 2, 3)


_FAULTS = """
import resource, sys, torch
from benchmarks import common
if sys.argv[1] == "keep":
    print(common.keep_freed_memory(), file=sys.stderr)
def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)  # 64 MiB, written: each page is faulted in unless the memory was reused
    y = x * 2  # and another
    del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_step()  # the first step faults its pages in either way
print(min(faults_of_a_step() for _ in range(3)))
"""


def test_a_cpu_case_keeps_freed_memory_so_steps_do_not_fault_it_back_in():
    """keep_freed_memory (called by setup on the CPU): a step that allocates what the previous one freed reuses the
    pages. By default glibc unmaps large blocks on free, so each step faults its 128 MiB (32k pages) in again."""
    import platform

    import pytest

    if platform.system() != "Linux":
        pytest.skip("glibc malloc")

    def faults(mode):
        run = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return int(run.stdout), run.stderr

    default, _ = faults("default")
    kept, said = faults("keep")
    if "freed memory kept" not in said:
        pytest.skip(f"not glibc: {said.strip()}")
    assert default > 20_000 and kept < 2_000, (default, kept)
