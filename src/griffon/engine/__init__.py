"""The continuous-batching engine, a library component apart from any HTTP front end: the engine
(:mod:`.core`: admit, prefill under a token budget, decode) with its scheduler (:mod:`.scheduler`),
model runner (:mod:`.runner`) and output processor (:mod:`.output`), requests (:mod:`.request`),
the prefix-state cache (:mod:`.prefix_cache`), the limits on a request (:mod:`.limits`), metrics
(:mod:`.metrics`), and the clients that run it (:mod:`.client`: on a thread of the caller's process,
or in a process of its own, :mod:`.process`)."""

from griffon.decode.sampling import SamplingParams
from griffon.engine.core import Engine, EngineThread
from griffon.engine.request import QueueFull, Request

__all__ = ["Engine", "EngineThread", "QueueFull", "Request", "SamplingParams"]
