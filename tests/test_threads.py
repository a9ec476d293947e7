"""The intra-op thread count chosen at start-up (training/threads.py)."""

import os
import subprocess
import sys

import pytest
from transformers import CLIPConfig, CLIPModel

from training.standin_clip import small_clip_config
from training.threads import SMALL_MODEL_PARAMETERS, estimated_parameters


def layer_weight_count(model: CLIPModel) -> int:
    """The weight matrices of both towers' transformer layers, counted on the built model."""
    layers = [*model.vision_model.encoder.layers, *model.text_model.encoder.layers]
    return sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() == 2)


def test_estimate_counts_the_layer_weights_of_the_built_model():
    config = small_clip_config(width=48, layers=3, heads=4)
    config.text_config.intermediate_size = 100  # towers of different shapes
    config.text_config.num_hidden_layers = 2
    assert estimated_parameters(config) == layer_weight_count(CLIPModel(config))


def test_stand_in_is_small_and_a_pretrained_clip_is_not():
    assert estimated_parameters(small_clip_config(width=128, layers=4)) < SMALL_MODEL_PARAMETERS
    assert estimated_parameters(CLIPConfig()) > 4 * SMALL_MODEL_PARAMETERS  # ViT-B/32's sizes: ~85 M in the layers


def choose(config: str, env: dict, idle: str = "...") -> tuple[list[str], str]:
    code = (
        "import torch, transformers\n"
        "transformers.utils.logging.set_verbosity_error()\n"
        "import logging; logging.basicConfig(level='INFO')\n"
        "from transformers import CLIPConfig\n"
        "from training.standin_clip import small_clip_config\n"
        "from training.threads import configure_threads\n"
        f"config = {config}\n"
        f"print(configure_threads(config, idle={idle}), configure_threads(CLIPConfig()), torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split(), out.stderr


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: nothing to choose")
def test_small_model_on_a_busy_machine_runs_on_one_thread_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    counts, log = choose("small_clip_config()", env, idle="0.9")  # another process holds a CPU
    assert counts == ["1", "1", "1"]  # chosen once, by the first model
    assert "0.9 of" in log and "1 intra-op thread" in log and "OMP_NUM_THREADS" in log
    counts, log = choose("small_clip_config()", env, idle=str(float(os.cpu_count())))  # an idle machine
    assert counts[0] == counts[2] and int(counts[0]) > 1 and "idle machine" in log
    counts, log = choose("CLIPConfig()", env, idle="0.0")  # a large model keeps the default even when busy
    assert counts[0] == counts[2] and int(counts[0]) > 1 and "PyTorch's default" in log
    counts, log = choose("small_clip_config()", dict(env, OMP_NUM_THREADS="2"), idle="0.0")
    assert counts == ["2", "2", "2"] and "as set" in log


def test_idle_cpus_reads_the_machine():
    from training.threads import idle_cpus

    idle = idle_cpus(0.05)
    if idle is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= idle <= (os.cpu_count() or 1) + 1e-6
