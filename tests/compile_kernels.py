"""Compile every Triton kernel variant for a Hopper GPU (sm_90) without one: Triton's own
compiler and its bundled ptxas, ahead of time. The interpreter runs the kernels' arithmetic but
not the compiler's checks (typing, constexpr globals, layouts); this catches what only a GPU
build would. Run as a script (with TRITON_INTERPRET unset): ``python tests/compile_kernels.py``."""

import itertools
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from griffon.nn import conv1d_gpu
from griffon.nn.rglru import MAX_SQRT_GRADIENT, RGLRU_C
from griffon.scan import gpu

HOPPER = GPUTarget("cuda", 90, 32)


SCAN_INTS = {"T", "D", "CHUNK", "NC"}
CONV_INTS = {"T", "C"}


def compile_kernel(fn, ints: set[str], dtypes: dict[str, str], constexprs: dict[str, object]) -> None:
    """Compile ``fn`` with the named constexprs, i32 arguments ``ints``, and every other argument a
    pointer to ``dtypes[name]`` (fp32 by default)."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ints:
            signature[name] = "i32"
        else:
            signature[name] = "*" + dtypes.get(name, "fp32")
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=HOPPER)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "compiling needs the real triton.jit"
    n = 0
    variants = itertools.product((False, True), (False, True), ((False, "fp32"), (True, "bf16")))
    for gated, summary, (varlen, dt) in variants:
        streams = {k: dt for k in ("A", "X", "ZX", "ZA", "Y", "DY", "DA", "DX", "DZX", "DZA")}
        dtypes = {**streams, "RESET": "u8", "CU": "i32"}
        flags = dict(C=RGLRU_C, GATED=gated, VARLEN=varlen, SUMMARY=summary, BT=gpu.BLOCK_T, BD=gpu.BLOCK_D)
        compile_kernel(gpu._fwd_kernel, SCAN_INTS, dtypes, dict(HAS_INIT=not summary, STORE_H32=dt != "fp32", **flags))
        compile_kernel(
            gpu._bwd_kernel, SCAN_INTS, dtypes, dict(MIN_4U=1.0 / MAX_SQRT_GRADIENT**2, HAS_H0=True, **flags)
        )
        n += 2
    for reverse in (False, True):
        flags = dict(HAS_INIT=True, VARLEN=True, REVERSE=reverse, BD=gpu.BLOCK_D)
        compile_kernel(gpu._carry_kernel, SCAN_INTS, {"CU": "i32"}, flags)
        n += 1
    for dt in ("fp32", "bf16"):
        dtypes = {"X": dt, "Y": dt, "DY": dt, "DX": dt, "SEG": "i64"}
        tiles = dict(K=4, BT=conv1d_gpu.BLOCK_T, BD=conv1d_gpu.BLOCK_D)
        compile_kernel(conv1d_gpu._conv_fwd_kernel, CONV_INTS, dtypes, tiles)
        compile_kernel(conv1d_gpu._conv_bwd_kernel, CONV_INTS, dtypes, tiles)
        n += 2
    print(f"{n} kernels compiled for sm_90")


if __name__ == "__main__":
    main()
