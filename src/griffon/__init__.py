"""griffon: train, evaluate, sample and benchmark Griffin, Hawk and MQA-transformer language models."""

from griffon.checkpoint import from_pretrained, save_pretrained
from griffon.config import ConfigError, ModelConfig
from griffon.model import Cache, Griffon
from griffon.presets import get_preset, preset_names

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "ConfigError",
    "Griffon",
    "ModelConfig",
    "from_pretrained",
    "get_preset",
    "preset_names",
    "save_pretrained",
]
