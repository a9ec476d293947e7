"""Speed and memory of VL-LTR against plain CLIP, as ratios measured in one process (see benchmarks/README.md)."""
