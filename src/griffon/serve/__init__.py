"""Serving: the continuous-batching engine (:mod:`.engine`), the prefix-state cache
(:mod:`.prefix_cache`) and the OpenAI-compatible HTTP server (:mod:`.server`, the ``serve`` extra)."""

from griffon.decode.sampling import SamplingParams
from griffon.serve.engine import Engine, EngineThread, QueueFull, Request

__all__ = ["Engine", "EngineThread", "QueueFull", "Request", "SamplingParams"]
