"""The model's own decode step compiled by ``torch.compile``: ``generate(..., step="compiled")``.

Inductor turns the step into a few generated C++ (CPU) or Triton (GPU) kernels with the small ops
fused, and with ``max_autotune`` times each matmul against its own GEMM kernels, which beat MKL at
a decode step's few rows on the CPU (docs/sampling.md). Those need the weights frozen (folded in
as constants), so, as with :class:`~griffon.decode.fused.FusedDecoder`, a compiled step reads the
weights once: build a new one after changing the model.

Shapes are static (``dynamic=False``): each batch size compiles once (autotuning costs seconds per
matmul shape), and a static graph is what the GEMM kernels are chosen for. The one shape that
changes every step, the length of a global-attention cache, is marked dynamic before each call.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import torch

from griffon.model import Cache, Griffon
from griffon.nn.attention import Attention, AttentionState

# Inductor settings: autotuned GEMMs, quietly. (Freezing, which they rely on, did not take effect
# when given here, so it is switched on around each call instead.)
COMPILE_OPTIONS = {
    "max_autotune": True,
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


def compiled_step(model: Griffon) -> Callable[[torch.Tensor, Cache], torch.Tensor]:
    """``step(tokens (B,), cache) -> logits (B, V)`` advancing ``cache``: the model's forward on one
    token per row under ``torch.compile``. Compiles on the first call of each batch size."""
    from torch._inductor import config as inductor_config  # imported here: it adds seconds to `import griffon`

    if model.embed.weight.device.type == "cpu":
        cxx = inductor_config.cpp.cxx[-1]  # $CXX, else g++ (clang++ on macOS)
        if shutil.which(cxx) is None:
            raise RuntimeError(
                f"the compiled decode step on the CPU needs a C++ compiler ({cxx}, or set CXX); none found"
            )
    forward = torch.compile(model, dynamic=False, options=COMPILE_OPTIONS)
    growing = [
        i for i, b in enumerate(model.blocks) if isinstance(b.temporal, Attention) and b.temporal.history is None
    ]

    def step(tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
        for i in growing:
            state = cache.blocks[i]
            assert isinstance(state, AttentionState)
            for t in (state.keys, state.values, state.positions):
                torch._dynamo.maybe_mark_dynamic(t, 1)  # the slots grow by one each step
        with inductor_config.patch(freezing=True):
            logits, new = forward(tokens[:, None], cache=cache)
        cache.advance_to(new)
        return logits[:, -1]

    return step
