"""Model card templates. Every checkpoint's README.md is generated from these by `training.model_card`."""

from pathlib import Path

TEMPLATE_PATH = Path(__file__).with_name("vlltr.md")
