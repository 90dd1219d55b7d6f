"""griffon: train, evaluate, sample, serve and benchmark Griffin, Hawk and MQA-transformer language
models, and study how they scale.

The layers, lowest first: ``scan`` (the linear scan and its backends), ``nn`` (the RG-LRU, attention,
convolution, structured FFN layers), ``model`` (the residual blocks and the cache), ``decode``
(decode steps and sampling), ``eval`` (scoring, lm-eval), ``train``
(the trainer, ``model=auto``, self-guided training, parallelism), ``scaling`` (sweeps, fits,
calibration), ``serve`` (the batching engine and the OpenAI-compatible server), ``bench``
(benchmarks), ``cli`` (the command line)."""

from griffon.checkpoint import from_pretrained, resolve, save_pretrained
from griffon.config import ConfigError, LinearStructure, ModelConfig
from griffon.decode import generate, generate_stream, generate_text
from griffon.eval.score import score_documents
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
