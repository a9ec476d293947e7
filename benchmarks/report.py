"""Reads the JSON lines of `make bench` runs: a markdown table of one run, or how far two runs' ratios agree.

    python -m benchmarks.report bench_output/bench.jsonl                      # the table (as in the README)
    python -m benchmarks.report quick.jsonl --against full.jsonl --tolerance 0.05
    python -m benchmarks.report busy.jsonl --against idle.jsonl --tolerance 0.10

With `--against`, each case's headline time ratio (the median of the per-round paired ratios) and memory ratio are
compared, |a / b − 1| ≤ tolerance; the exit status is 1 if any case misses it or is missing from one of the runs.
Both views also give the noise of each headline, estimated from its own rounds (`standard_error`), so a difference
can be read against what the two runs' noise alone would make.
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def read_lines(path: str) -> list[dict]:
    """The result lines of a run (`bench.jsonl`, or the captured stdout of `run_all`), each a JSON object."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"benchmarks.report: {path}: no such file (write one with `make bench`).")
    lines = []
    for number, text in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not text.startswith("{"):
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise SystemExit(f"benchmarks.report: {path}:{number}: not a JSON line ({e.msg}).") from None
    if not lines:
        raise SystemExit(f"benchmarks.report: {path}: no result lines.")
    return lines


def standard_error(line: dict) -> float | None:
    """Relative standard error of a line's headline (the median of its paired ratios), estimated from the rounds:
    the median's asymptotic standard error 1.2533·σ/√n, with σ taken robustly as 1.4826 × the median absolute
    deviation (the rounds' noise is heavy-tailed). None when the line has fewer than 3 rounds."""
    ratios = line.get("paired_ratios") or []
    if len(ratios) < 3:
        return None
    median = statistics.median(ratios)
    mad = statistics.median(abs(r - median) for r in ratios)
    return 1.2533 * 1.4826 * mad / math.sqrt(len(ratios)) / median


def _percent(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.1f}%"


def table(lines: list[dict]) -> str:
    rows = [
        "| case | ours (s) | floor (s) | time ratio ± SE [IQR] (bound) | peak MB ours / floor | memory ratio (bound) "
        "| rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in lines:
        se = standard_error(r)
        time = f"{r['ratio']:.3f}{'' if se is None else f' ±{_percent(se)}'} [{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}] (≤ {r['bound']})"
        memory = f"{r['memory_ratio']:.3f} (≤ {r['memory_bound']})"
        rows.append(
            f"| {r['case']} | {r['ours_s']:.3f} | {r['floor_s']:.3f} | {time}{'' if r['ok'] else ' MISSED'} | "
            f"{r['ours_peak_mb']:.1f} / {r['floor_peak_mb']:.1f} | {memory}{'' if r['memory_ok'] else ' MISSED'} | "
            f"{r['repeats']} |"
        )
    first = lines[0]
    threads = first.get("threads", "?")
    rows.append("")
    rows.append(
        f"{first['device']} ({first.get('cpu', '?')}), {threads} thread{'' if threads == 1 else 's'}, "
        f"torch {first['torch']}, "
        f"clock: {first.get('clock', 'wall')}; ours / floor (s) are the medians of the rounds' times; SE: the "
        "headline's relative standard error estimated from its rounds (1.86 x median absolute deviation / sqrt(rounds))."
    )
    return "\n".join(rows)


def agreement(lines: list[dict], reference: list[dict], tolerance: float) -> tuple[str, bool]:
    by_case = {r["case"]: r for r in reference}
    rows = ["| case | time ratio | reference | difference | noise (SE) | memory ratio | reference | difference | within |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ok = {r["case"] for r in lines} == set(by_case)
    for r in lines:
        ref = by_case.get(r["case"])
        if ref is None:
            rows.append(f"| {r['case']} | {r['ratio']:.3f} | missing | | | | | | no |")
            continue
        d_time = r["ratio"] / ref["ratio"] - 1
        d_memory = r["memory_ratio"] / ref["memory_ratio"] - 1
        within = abs(d_time) <= tolerance and abs(d_memory) <= tolerance
        ok &= within
        errors = standard_error(r), standard_error(ref)
        noise = None if None in errors else math.hypot(*errors)  # of the difference: both runs' noise
        rows.append(
            f"| {r['case']} | {r['ratio']:.3f} | {ref['ratio']:.3f} | {100 * d_time:+.1f}% | ±{_percent(noise)} | "
            f"{r['memory_ratio']:.3f} | {ref['memory_ratio']:.3f} | {100 * d_memory:+.1f}% | {'yes' if within else 'NO'} |"
        )
    for case in sorted(set(by_case) - {r["case"] for r in lines}):
        rows.append(f"| {case} | missing | {by_case[case]['ratio']:.3f} | | | | | | no |")
    rows += [
        "",
        f"tolerance ±{100 * tolerance:.0f}%: {'every case within it' if ok else 'MISSED'}; noise: the standard error "
        "of the time difference that the two runs' round-to-round noise alone gives (see `standard_error`).",
    ]
    return "\n".join(rows), ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the JSON lines of a run (bench_output/bench.jsonl)")
    p.add_argument("--against", default=None, help="a reference run to compare the ratios with")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed relative difference (default 0.05)")
    args = p.parse_args(argv)
    lines = read_lines(args.run)
    if args.against is None:
        print(table(lines))
        return 0
    text, ok = agreement(lines, read_lines(args.against), args.tolerance)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
