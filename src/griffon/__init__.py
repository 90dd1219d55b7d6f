"""griffon: train, evaluate, sample and benchmark Griffin, Hawk and MQA-transformer language models."""

from griffon.checkpoint import from_pretrained, resolve, save_pretrained
from griffon.config import ConfigError, LinearStructure, ModelConfig
from griffon.decode import generate, generate_stream, generate_text
from griffon.evaluate import score_documents
from griffon.model import Cache, Griffon
from griffon.presets import get_preset, preset_names

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "ConfigError",
    "Griffon",
    "LinearStructure",
    "ModelConfig",
    "from_pretrained",
    "generate",
    "generate_stream",
    "generate_text",
    "get_preset",
    "preset_names",
    "resolve",
    "save_pretrained",
    "score_documents",
]
