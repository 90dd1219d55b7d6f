"""Serving: the continuous-batching engine (:mod:`.engine`) with its scheduler (:mod:`.scheduler`),
model runner (:mod:`.runner`) and output processor (:mod:`.output`), requests (:mod:`.request`),
the prefix-state cache (:mod:`.prefix_cache`), the
limits on a request (:mod:`.limits`), metrics, and the OpenAI-compatible HTTP server
(:mod:`.server`, the ``serve`` extra)."""

from griffon.decode.sampling import SamplingParams
from griffon.serve.engine import Engine, EngineThread
from griffon.serve.request import QueueFull, Request

__all__ = ["Engine", "EngineThread", "QueueFull", "Request", "SamplingParams"]
