"""The Triton kernels (scan/gpu.py) against the float64 references: plain scan, fused RG-LRU,
chunked time, packed sequences (cu_seqlens) and the model's dispatch.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1),
which is slow: shapes are small, and small tiles (block_t=8, block_d=16) make them span several
tiles and channel blocks. Tests marked ``gpu`` need CUDA and skip without it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from griffon import Griffon, get_preset
from griffon.nn.conv1d import CausalConv1D
from griffon.nn.rglru import RGLRU
from griffon.packing import cu_seqlens_from_segment_pos, segment_pos_from_cu_seqlens, varlen_batch
from griffon.scan import linear_scan
from griffon.scan.reference import linear_scan_reference, linear_scan_varlen_reference

from segments import doc_positions

pytest.importorskip("triton")
from griffon.nn.rglru import MAX_SQRT_GRADIENT, RGLRU_C  # noqa: E402
from griffon.scan.gpu import linear_scan_gpu, rglru_scan_gpu  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SMALL = dict(block_t=8, block_d=16)
CONSTANTS = dict(c=RGLRU_C, max_sqrt_gradient=MAX_SQRT_GRADIENT)

# (B, T, D, chunk): one step and one channel; T not a multiple of the tile; chunks that split
# time unevenly (chunk is a multiple of block_t; the last chunk is short).
SHAPES = [(1, 1, 1, None), (2, 37, 5, None), (2, 37, 20, 16), (1, 45, 3, 8)]


def _scan_inputs(B, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, D, generator=g, dtype=torch.float64)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    reset = torch.rand(B, T, generator=g) < 0.15
    reset[0, -1] = True  # a reset at the last step
    if B > 1:
        reset[1, 0] = True  # and at the first, which drops h0
    return a, x, h0, reset


def _grads(outputs, inputs, seed):
    g = torch.Generator().manual_seed(seed + 100)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs]
    loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
    return list(torch.autograd.grad(loss, inputs))


def _leaves(*tensors, dtype=torch.float32):
    return [t.detach().to(DEVICE, dtype).requires_grad_() for t in tensors]


def _assert_close(got, want, names, tol=2e-5):
    for o, w, name in zip(got, want, names, strict=True):
        scale = w.abs().max().item() + 1e-6
        err = (o.detach().cpu().double() - w).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("B,T,D,chunk", SHAPES)
def test_scan_matches_reference(B, T, D, chunk):
    a, x, h0, reset = _scan_inputs(B, T, D, seed=T)
    ref_in = [t.requires_grad_() for t in (a, x, h0)]
    want = linear_scan_reference(*ref_in, reset)
    want = [*want, *_grads(want, ref_in, T)]
    got_in = _leaves(a, x, h0)
    got = linear_scan_gpu(*got_in, reset.to(DEVICE), chunk=chunk, **SMALL)
    got = [*got, *_grads(got, got_in, T)]
    _assert_close(got, want, ["h", "h_last", "da", "dx", "dh0"])


def test_scan_without_h0_or_resets_and_through_the_dispatcher():
    a, x, _, _ = _scan_inputs(2, 19, 7, seed=1)
    want, want_last = linear_scan_reference(a, x)
    got, got_last = linear_scan(*_leaves(a, x), backend="triton")
    _assert_close([got, got_last], [want, want_last], ["h", "h_last"])


def test_scan_bfloat16_streams_keep_a_float32_state():
    """bf16 inputs and outputs: the state is float32, so the only error is the output's rounding."""
    a, x, h0, reset = _scan_inputs(2, 37, 20, seed=5)
    a, x = (t.to(torch.bfloat16).double() for t in (a, x))  # the reference sees the same inputs
    want, want_last = linear_scan_reference(a, x, h0, reset)
    got, got_last = linear_scan_gpu(*_leaves(a, x, dtype=torch.bfloat16), h0.float().to(DEVICE), reset, **SMALL)
    assert got.dtype == torch.bfloat16 and got_last.dtype == torch.float32
    _assert_close([got], [want], ["h"], tol=8e-3)  # bf16 keeps 8 bits of mantissa
    _assert_close([got_last], [want_last], ["h_last"])


@pytest.mark.parametrize("chunk", [None, 8])
def test_scan_packed_sequences(chunk):
    """cu_seqlens: each sequence starts from its own h0 row and ends in its own final state;
    in-row resets still apply inside a sequence."""
    cu = torch.tensor([0, 1, 14, 15, 40], dtype=torch.int32)  # lengths 1, 13, 1, 25
    a, x, _, reset = _scan_inputs(1, 40, 6, seed=2)
    h0 = torch.randn(4, 6, dtype=torch.float64)
    ref_in = [t.requires_grad_() for t in (a, x, h0)]
    want = linear_scan_varlen_reference(ref_in[0], ref_in[1], cu, ref_in[2], reset)
    want = [*want, *_grads(want, ref_in, 2)]
    got_in = _leaves(a, x, h0)
    got = linear_scan_gpu(*got_in, reset.to(DEVICE), cu_seqlens=cu.to(DEVICE), chunk=chunk, **SMALL)
    got = [*got, *_grads(got, got_in, 2)]
    _assert_close(got, want, ["h", "h_last", "da", "dx", "dh0"])


def _rglru(width=20, blocks=2, seed=0):
    torch.manual_seed(seed)
    layer = RGLRU(width, blocks).double()
    with torch.no_grad():
        layer.input_gate.bias.normal_()
        layer.a_gate.bias.normal_()
        layer.a_param[0] = -9.0  # a ~ 1 - 1e-4: the bounded sqrt derivative applies
    return layer


def _rglru_case(layer, seg, h0, x, backend, chunk=None):
    """Values and gradients (x, h0, every parameter) of one RG-LRU call with a given path."""
    inputs = [x, h0, *layer.parameters()]
    if backend == "fused":
        zx, za = layer.input_gate(x), layer.a_gate(x)
        out = rglru_scan_gpu(x, zx, za, F.softplus(layer.a_param), h0, seg == 0, chunk=chunk, **CONSTANTS, **SMALL)
    else:
        out = layer(x, seg, h0, scan_backend=backend)
    return [*out, *_grads(out, inputs, 7)]


@pytest.mark.parametrize("T,chunk", [(23, None), (23, 8), (1, None)])
def test_fused_rglru_matches_the_layer(T, chunk):
    """Same values and gradients as RGLRU's PyTorch path (float64): documents starting at the
    first, a middle and the last step, and a row that continues from its carried state."""
    layer = _rglru()
    starts = [[T - 1, 9], [], [1, 2, 15]]
    seg = torch.stack([doc_positions(T, [s for s in st if s < T]) for st in starts])
    seg[1] += 4  # row 1 continues a document: h0 matters
    x = torch.randn(3, T, 20, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    want = _rglru_case(layer, seg, h0, x, "reference")
    fused = layer.float().to(DEVICE)
    got = _rglru_case(fused, seg.to(DEVICE), *_leaves(h0, x), "fused", chunk=chunk)
    names = ["y", "h_last", "dx", "dh0"] + [n for n, _ in fused.named_parameters()]
    _assert_close(got, want, names, tol=5e-5)


def test_fused_rglru_bfloat16_inputs():
    """bf16 activations (as under autocast): the gates are read in bf16, all arithmetic is float32."""
    layer = _rglru()
    seg = torch.stack([doc_positions(23, [9]), doc_positions(23, [])])
    x = torch.randn(2, 23, 20, dtype=torch.float64).to(torch.bfloat16)
    zx, za = (lin(x.double()).to(torch.bfloat16) for lin in (layer.input_gate, layer.a_gate))
    sp = F.softplus(layer.a_param).detach()
    with torch.no_grad():
        want, want_last = layer.float()(x.float(), seg)  # its gates in float32 from the same inputs
        got, got_last = rglru_scan_gpu(x.to(DEVICE), zx.to(DEVICE), za.to(DEVICE), sp.float().to(DEVICE),
                                       reset=(seg == 0).to(DEVICE), **CONSTANTS, **SMALL)  # fmt: skip
    assert got.dtype == torch.bfloat16
    _assert_close([got, got_last], [want.double(), want_last.double()], ["y", "h_last"], tol=2e-2)


def test_fused_rglru_packed_sequences_equal_separate_calls():
    layer = _rglru().float().to(DEVICE)
    cu = torch.tensor([0, 5, 6, 30], dtype=torch.int32)
    x = torch.randn(1, 30, 20, device=DEVICE)
    h0 = torch.randn(3, 20, device=DEVICE)
    sp = F.softplus(layer.a_param)
    with torch.no_grad():
        zx, za = layer.input_gate(x), layer.a_gate(x)
        packed, packed_last = rglru_scan_gpu(x, zx, za, sp, h0, cu_seqlens=cu.to(DEVICE), chunk=8, **CONSTANTS, **SMALL)
        for n in range(3):
            s, e = int(cu[n]), int(cu[n + 1])
            seg = torch.arange(1, e - s + 1, device=DEVICE)[None]  # continuing from h0: no reset
            y, last = layer(x[:, s:e], seg, h0[n : n + 1], scan_backend="loop")
            _assert_close([packed[:, s:e], packed_last[n : n + 1]], [y.double(), last.double()], ["y", "h_last"])


@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny"])
def test_model_on_the_fused_kernel_matches_the_cpu_scan(preset):
    """The whole model: logits and every parameter's gradient, fused kernel vs the numba scan."""
    torch.manual_seed(0)
    model = Griffon(get_preset(preset).replace(num_layers=2)).to(DEVICE)
    tokens = torch.randint(0, 256, (2, 23), device=DEVICE)
    seg = torch.stack([doc_positions(23, [9]), doc_positions(23, [])]).to(DEVICE)
    results = {}
    for backend in ("loop", "triton"):
        model.zero_grad()
        model.set_scan_backend(backend)
        logits, _ = model(tokens, seg)
        logits.square().mean().backward()
        results[backend] = [logits.detach()] + [p.grad.clone() for p in model.parameters()]
    _assert_close(results["triton"], [r.cpu().double() for r in results["loop"]], ["logits"] + [
        n for n, _ in model.named_parameters()
    ], tol=1e-4)  # fmt: skip


def test_model_takes_cu_seqlens_like_segment_pos():
    """A (B, T) batch and the same tokens as one packed stream with cu_seqlens give the same logits."""
    model = Griffon(get_preset("griffin-tiny")).eval()
    tokens = torch.randint(0, 256, (2, 31))
    seg = torch.stack([doc_positions(31, [9, 30]), doc_positions(31, [])])
    full = torch.cat([tokens, tokens[:, :1]], dim=1)
    inputs, targets, cu = varlen_batch(full, torch.cat([seg, seg[:, :1]], dim=1))
    assert cu.tolist() == [0, 9, 30, 31, 62]
    assert torch.equal(targets.view(2, 31)[:, :-1], tokens[:, 1:])
    with torch.no_grad():
        want, _ = model(tokens, seg)
        got, _ = model(inputs, cu_seqlens=cu)
    torch.testing.assert_close(got.view(2, 31, -1), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(segment_pos_from_cu_seqlens(cu, 62).view(2, 31), seg)
    assert torch.equal(cu_seqlens_from_segment_pos(seg), cu)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(cu_seqlens=torch.tensor([0, 5, 5, 12])), "strictly increasing"),
        (dict(cu_seqlens=torch.tensor([0, 5, 11])), "offsets from 0"),
        (dict(h0=torch.zeros(2, 3, dtype=torch.float64)), "h0 must be"),
        (dict(reset=torch.zeros(2, 12, dtype=torch.bool)), "reset must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    a = torch.rand(1, 12, 3, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        linear_scan_gpu(a, a, **kwargs)


def test_float64_and_mismatched_inputs_are_refused():
    a = torch.rand(1, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        linear_scan_gpu(a.to(DEVICE), a.to(DEVICE))
    with pytest.raises(ValueError, match="must match"):
        linear_scan_gpu(a.float().to(DEVICE), a.to(DEVICE))


def test_fused_rglru_bounds_the_sqrt_derivative_like_the_layer():
    """A channel with a_t within 1e-7 of 1, where d sqrt(1 - a^2) is capped at 1000: its
    Lambda gradient, dominated by the cap, agrees with the layer's."""
    layer = _rglru(width=4, blocks=1)
    with torch.no_grad():
        layer.a_param[0] = -9.2  # softplus ~ 1e-4
        layer.a_gate.weight[0, :, 0] = 0.0
        layer.a_gate.bias[0, 0] = -9.2  # recurrence gate ~ 1e-4: log a_t ~ -8e-8
    seg = torch.arange(1, 17)[None].expand(2, 16)  # no resets: the multiplier stays in play
    x = torch.randn(2, 16, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    want = _rglru_case(layer, seg, h0, x, "reference")[4]  # d a_param
    got = _rglru_case(layer.float().to(DEVICE), seg.to(DEVICE), *_leaves(h0, x), "fused")[4]
    assert abs(got[0].item() - want[0].item()) <= 1e-2 * abs(want[0].item())


@pytest.mark.parametrize("T,K", [(70, 4), (1, 4), (9, 1), (23, 3)])
def test_triton_conv1d_matches_the_pytorch_formulation(T, K, monkeypatch):
    """Values and gradients (x, weight, bias) with documents starting mid-row and at the last step;
    small tiles so T spans several."""
    monkeypatch.setattr("griffon.nn.conv1d_gpu.BLOCK_T", 16)
    monkeypatch.setattr("griffon.nn.conv1d_gpu.BLOCK_D", 16)
    torch.manual_seed(T)
    conv = CausalConv1D(20, K).double()
    with torch.no_grad():
        conv.bias.normal_()
    seg = torch.stack([doc_positions(T, [s for s in (9, T - 1) if 0 < s < T]), doc_positions(T, [])])
    x = torch.randn(2, T, 20, dtype=torch.float64, requires_grad=True)
    want, want_state = conv(x, seg)
    want = [want, *_grads([want], [x, *conv.parameters()], T)]
    fast = conv.float().to(DEVICE)
    (xf,) = _leaves(x)
    got, state = fast(xf, seg.to(DEVICE), triton=True)
    got = [got, *_grads([got], [xf, *fast.parameters()], T)]
    _assert_close(got, want, ["y", "dx", "dweight", "dbias"])
    torch.testing.assert_close(state.cpu().double(), want_state, rtol=1e-6, atol=1e-6)


# ----- on a GPU: real kernels at sizes that fill it, against the portable PyTorch paths -----------


@gpu
@pytest.mark.parametrize(
    "shape,dtype",
    [((4, 1000, 300), torch.float32), ((1, 5000, 64), torch.float32), ((2, 777, 1000), torch.bfloat16)],
)
def test_gpu_scans_match_the_loop_backend(shape, dtype):
    """Shapes that are not multiples of the tiles; (1, 5000, 64) has too few programs for the
    GPU, so time is chunked automatically."""
    a, x, h0, reset = (t.cuda() for t in _scan_inputs(*shape, seed=11))
    ref_in = [t.float().requires_grad_() for t in (a, x, h0)]
    want = linear_scan(*ref_in, reset, backend="loop")
    want = [w.double().cpu() for w in [*want, *_grads(want, ref_in, 3)]]
    got_in = [a.to(dtype).requires_grad_(), x.to(dtype).requires_grad_(), h0.float().requires_grad_()]
    got = linear_scan_gpu(*got_in, reset)
    got = [*got, *_grads(got, got_in, 3)]
    _assert_close(got, want, ["h", "h_last", "da", "dx", "dh0"], tol=1e-4 if dtype == torch.float32 else 2e-2)


def _model_results(model, tokens, seg, autocast: bool):
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits, _ = model(tokens, seg)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    return [logits.detach().float()] + [p.grad.clone() for p in model.parameters()]


@gpu
@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny", "mqa-tiny"])
def test_gpu_model_paths_match_the_portable_ones(preset):
    """FlexAttention, the fused RG-LRU and the Triton Conv1D against SDPA blocks and the loop
    scan: logits and gradients, rows of several documents, longer than the window."""
    torch.manual_seed(0)
    model = Griffon(get_preset(preset)).cuda()
    tokens = torch.randint(0, 256, (2, 300), device="cuda")
    seg = torch.stack([doc_positions(300, [40, 211]), doc_positions(300, [])]).cuda()
    model.set_attention_kernel("blocks")
    model.set_scan_backend("loop")
    want = _model_results(model, tokens, seg, autocast=False)
    model.set_attention_kernel("auto")
    model.set_scan_backend("auto")
    got = _model_results(model, tokens, seg, autocast=False)
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    _assert_close(got, [w.double().cpu() for w in want], names, tol=1e-4)


@gpu
def test_gpu_bf16_autocast_training_follows_float32():
    """As tests/test_model.py checks on the CPU: under bf16 autocast on the GPU paths (fused
    RG-LRU, Triton Conv1D, FlexAttention) logits and gradients stay close to float32's."""
    torch.manual_seed(0)
    model = Griffon(get_preset("griffin-tiny")).cuda()
    tokens = torch.randint(0, 256, (4, 300), device="cuda")
    seg = torch.arange(300, device="cuda").expand(4, 300)
    l32, *g32 = _model_results(model, tokens, seg, autocast=False)
    l16, *g16 = _model_results(model, tokens, seg, autocast=True)
    assert not torch.equal(l16, l32) and torch.isfinite(l16).all()
    assert (l16 - l32).norm() / l32.norm() < 0.02
    g32, g16 = torch.cat([g.flatten() for g in g32]), torch.cat([g.flatten() for g in g16])
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99


@gpu
def test_gpu_packed_stream_with_cu_seqlens():
    model = Griffon(get_preset("griffin-tiny")).cuda().eval()
    tokens = torch.randint(0, 256, (2, 200), device="cuda")
    seg = torch.stack([doc_positions(200, [37]), doc_positions(200, [])]).cuda()
    cu = cu_seqlens_from_segment_pos(seg)
    with torch.no_grad():
        want, _ = model(tokens, seg)
        got, _ = model(tokens.reshape(1, -1), cu_seqlens=cu)
    torch.testing.assert_close(got.view(2, 200, -1), want, rtol=1e-4, atol=1e-4)


def test_every_kernel_compiles_for_a_hopper_gpu():
    """Triton's compiler (not its interpreter) on every kernel variant, for sm_90, without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent / "compile_kernels.py"
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels compiled for sm_90" in done.stdout
