"""Decoding: the single-token step, chosen among the model's own, the fused CPU kernels, a compiled
one and CUDA graphs (:mod:`griffon.decode.steps`), and the sampler on top (:mod:`griffon.decode.generate`).

Every step reads and advances the same :class:`~griffon.model.Cache`; ``tests/test_decode_steps.py``
compares each with the model's step, step by step.
"""

from griffon.decode.calibration import calibrate_merge_thresholds
from griffon.decode.generate import (
    GenerationError,
    generate,
    generate_stream,
    generate_text,
    prefill,
    stream_tokens,
)
from griffon.decode.output import TextStream
from griffon.decode.steps import STEPS, make_step

__all__ = [
    "STEPS",
    "GenerationError",
    "TextStream",
    "calibrate_merge_thresholds",
    "generate",
    "generate_stream",
    "generate_text",
    "make_step",
    "prefill",
    "stream_tokens",
]
