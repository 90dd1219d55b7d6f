"""The fast decode steps (fused CPU kernels; torch.compile) against the model's own step:
logits and caches, step by step."""

import copy
import shutil

import pytest
import torch

from griffon import Griffon
from griffon.config import LinearStructure, ModelConfig
from griffon.decode import GenerationError, compiled, kernels, steps
from griffon.decode.fused import FusedDecoder
from griffon.decode.generate import generate, prefill
from griffon.decode.kernels import _geglu, _soft_cap
from griffon.decode.steps import make_step
from griffon.model import Cache
from griffon.nn.attention import AttentionState

BASE = dict(vocab_size=64, width=48, num_layers=3, num_heads=4, num_kv_heads=1, mlp_width=80)
CONFIGS = {
    # a window of 5 and 12 steps after prompts of up to 9 tokens: the ring buffer wraps
    "griffin": dict(attention_window=5),
    "hawk": dict(block_pattern=("recurrent",)),
    "mqa-global": dict(block_pattern=("attention",), attention_window=None, max_seq_len=64),
    "gqa-partial-rope": dict(
        block_pattern=("attention", "recurrent"),
        num_kv_heads=2,
        rope_fraction=1 / 3,
        attention_window=3,
        window_semantics="hf",
    ),  # fmt: skip
    "no-softcap-no-embed-scale": dict(logit_soft_cap=0.0, embed_scale=False, attention_window=4, conv_width=2),
    "lowrank-ffn": dict(
        attention_window=5, ffn_structure=LinearStructure(kind="lowrank", rank=8, keep_first_dense=True)
    ),  # fmt: skip
}


def _model(overrides):
    torch.manual_seed(0)
    model = Griffon(ModelConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():  # non-zero norm gains, biases and conv weights, so every term is exercised
        for name, p in model.named_parameters():
            if name.endswith(("scale", "bias")) or ".conv." in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _assert_caches_close(a: Cache, b: Cache):
    assert torch.equal(a.position, b.position) and torch.equal(a.segment_pos, b.segment_pos)
    for x, y in zip(a.blocks, b.blocks, strict=True):
        assert type(x) is type(y)
        if isinstance(x, AttentionState):
            assert torch.equal(x.positions, y.positions)
            torch.testing.assert_close(x.keys, y.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x.values, y.values, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(x.rglru, y.rglru, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x.conv, y.conv, rtol=1e-5, atol=1e-5)


def _check_step_by_step(model: Griffon, step) -> None:
    """``step(tokens, cache) -> logits`` against the model's forward for 12 steps."""
    # rows at different positions, one of them fresh (position 0: a document starts, conv taps and
    # the recurrence's carried state are masked) and one past the window before decoding starts
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (9, 1, 4, 9)]
    _, cache = prefill(model, prompts, chunk=4)
    fresh = model.init_cache(1)
    cache = Cache.stack([cache, fresh])
    ref = copy.deepcopy(cache)
    for _ in range(12):
        tokens = torch.randint(0, 64, (cache.batch_size,))
        want, ref = model(tokens[:, None], cache=ref)
        got = step(tokens, cache)
        torch.testing.assert_close(got, want[:, -1], rtol=1e-5, atol=2e-5)
        _assert_caches_close(cache, ref)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", CONFIGS)
@torch.inference_mode()
def test_fused_step_equals_model_step(name, parallel, monkeypatch):
    monkeypatch.setattr("griffon.decode.fused.PARALLEL_MIN_ROWS", 1 if parallel else 10**9)
    model = _model(CONFIGS[name])
    _check_step_by_step(model, FusedDecoder(model).step)


needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs g++")


@pytest.mark.slow  # autotuning the matmuls takes about a minute
@needs_compiler
@torch.inference_mode()
def test_compiled_step_equals_model_step():
    from torch._dynamo.utils import counters

    model = _model(CONFIGS["griffin"])
    graphs = counters["stats"]["unique_graphs"]
    _check_step_by_step(model, make_step(model, "compiled"))
    assert counters["stats"]["unique_graphs"] - graphs == 1  # the cache's layout does not change across steps


@needs_compiler
@torch.inference_mode()
def test_compiled_step_follows_a_growing_global_attention_cache(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiled, "COMPILE_OPTIONS", {})  # the shapes matter here, not the GEMM kernels
    model = _model(CONFIGS["mqa-global"])
    graphs = counters["stats"]["unique_graphs"]
    _check_step_by_step(model, make_step(model, "compiled"))
    assert counters["stats"]["unique_graphs"] - graphs <= 2  # not one compile per cache length


@needs_compiler
@torch.inference_mode()
def test_compiled_steps_of_two_models_keep_their_own_weights(monkeypatch):
    monkeypatch.setattr(compiled, "COMPILE_OPTIONS", {})
    a, b = _model(CONFIGS["hawk"]), Griffon(ModelConfig(**{**BASE, **CONFIGS["hawk"]})).eval()
    tokens = torch.tensor([3, 5])
    for model in (a, b, a):
        got = make_step(model, "compiled")(tokens, model.init_cache(2))
        torch.testing.assert_close(got, model(tokens[:, None])[0][:, -1], rtol=1e-5, atol=2e-5)


def test_generation_uses_the_fused_step_and_matches_the_model_step():
    model = _model(CONFIGS["griffin"])
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (7, 2, 11)]
    fused = generate(model, prompts, 30, temperature=0.0)
    plain = generate(model, prompts, 30, temperature=0.0, step="model")
    assert fused == plain


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(norm_type="layernorm"), "RMSNorm"), (dict(mlp_type="gelu"), "GeGLU"), (dict(), None)],
)
def test_reason_names_what_is_not_covered(overrides, message):
    model = _model({**CONFIGS["hawk"], **overrides})
    assert FusedDecoder.reason(model) is None if message is None else message in FusedDecoder.reason(model)
    assert "float32 on the CPU" in FusedDecoder.reason(model.to(torch.float64))
    with pytest.raises(ValueError, match="does not cover"):
        FusedDecoder(model)
    assert generate(model, [[1, 2, 3]], 5, temperature=0.0)  # generation falls back to the model's step


@torch.inference_mode()
def test_written_out_gelu_and_tanh_match_torch_over_a_wide_range():
    x = torch.cat([torch.linspace(-30, 30, 20001), torch.randn(5000) * 3, torch.tensor([0.0, -0.0, 1e-8, -1e-8])])
    gate_up = torch.cat([x, torch.randn_like(x)])[None]  # (1, 2N): gates, then ups
    out = torch.empty(1, x.numel())
    _geglu(gate_up.numpy(), out.numpy())
    want = torch.nn.functional.gelu(x, approximate="tanh") * gate_up[0, x.numel() :]
    torch.testing.assert_close(out[0], want, rtol=1e-6, atol=1e-6)
    logits = (x * 10)[None].clone()
    _soft_cap(logits.numpy(), 30.0)
    torch.testing.assert_close(logits[0], torch.tanh(x * 10 / 30.0) * 30.0, rtol=2e-6, atol=1e-5)


def test_auto_step_fuses_only_up_to_the_size_limit(monkeypatch):
    model = _model(CONFIGS["griffin"])
    assert isinstance(make_step(model).__self__, FusedDecoder)
    monkeypatch.setattr(steps, "AUTO_FUSE_MAX_BYTES", 1000)
    assert not hasattr(make_step(model), "__self__")  # the model's own step
    assert isinstance(make_step(model, "fused").__self__, FusedDecoder)
    assert not hasattr(make_step(model, "model"), "__self__")


def test_unknown_uncovered_and_uncompilable_steps_are_refused():
    from torch._inductor import config

    model = _model(CONFIGS["hawk"])
    with pytest.raises(ValueError, match="step 'fast' is not one of"):
        make_step(model, "fast")
    with pytest.raises(ValueError, match="does not cover this model: it implements RMSNorm only"):
        make_step(_model(dict(norm_type="layernorm")), "fused")
    with config.patch({"cpp.cxx": (None, "no-such-compiler-here")}), pytest.raises(RuntimeError, match="C.. compiler"):
        make_step(model, "compiled")


SPECIAL_FLOATS = [0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 20.0, -20.0, 86.9, -86.9, 88.0, -88.0, 103.0, -103.0, 1e10,
                  -1e10, 1e30, -1e30, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan")]  # fmt: skip


@pytest.mark.parametrize(
    "name, ref, atol",
    [
        # below exp(-87) the kernels give 0 where torch gives subnormals (< 1.2e-38)
        ("_exp_neg", torch.exp, 2e-38),
        ("_sigmoid", torch.sigmoid, 2e-38),
        ("_tanh", torch.tanh, 3e-7),  # the rational approximation's documented accuracy
        ("_gelu_tanh", lambda t: torch.nn.functional.gelu(t, approximate="tanh"), 1.5e-5),  # 0.5 |x| 3e-7, |x| <= 100
    ],
)
def test_written_out_transcendentals_match_torch_for_every_float(name, ref, atol):
    """NaN, infinities and huge values once indexed the exponential's table out of bounds (SIGSEGV)."""
    import numpy as np

    f = getattr(kernels, name)
    xs = [x for x in SPECIAL_FLOATS if name != "_exp_neg" or not x > 0]  # exp_neg's domain is x <= 0
    xs += torch.empty(2000).uniform_(-100, 100 if name != "_exp_neg" else 0).tolist()
    got = torch.tensor([float(f(np.float32(x))) for x in xs])
    want = ref(torch.tensor(xs, dtype=torch.float32))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=atol, equal_nan=True)


def _overflowing(model: Griffon) -> Griffon:
    """The model with its MLP weights scaled by 1e30: finite weights, activations that overflow."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.mul_(1e30)
    return model


@torch.inference_mode()
def test_fused_step_survives_overflowing_activations():
    model = _overflowing(_model(CONFIGS["griffin"]))
    cache = model.init_cache(3)
    ref = copy.deepcopy(cache)
    tokens = torch.tensor([1, 2, 3])
    want, _ = model(tokens[:, None], cache=ref)
    got = FusedDecoder(model).step(tokens, cache)
    assert not torch.isfinite(want).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want[:, -1]))


@pytest.mark.parametrize("step", ["fused", "model"])
def test_generation_refuses_non_finite_logits(step):
    model = _overflowing(_model(CONFIGS["griffin"]))
    with pytest.raises(GenerationError, match="NaN or infinite logits after the prompt"):
        generate(model, [[1, 2, 3]], 4, temperature=0.0, step=step)


def test_graph_step_needs_a_gpu_and_a_fixed_size_cache():
    with pytest.raises(ValueError, match="CUDA device"):
        make_step(_model(CONFIGS["hawk"]), "graph")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="global-attention cache grows"):
            make_step(_model(CONFIGS["mqa-global"]).cuda(), "graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["griffin", "hawk", "gqa-partial-rope"])
@torch.inference_mode()
def test_graph_step_equals_model_step(name):
    """Replayed graphs against the model's step on the GPU, including a cache that does not alias
    the graph's buffers (a batch whose rows were reordered)."""
    model = _model(CONFIGS[name]).cuda()
    step = make_step(model, "graph")
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (9, 1, 4)]
    _, cache = prefill(model, prompts, chunk=4)
    ref = copy.deepcopy(cache)
    for i in range(12):
        if i == 6:  # a different cache object of the same batch size: copied into the graph's buffers
            order = torch.tensor([2, 0, 1], device="cuda")
            cache, ref = cache.select(order), ref.select(order)
        tokens = torch.randint(0, 64, (3,), device="cuda")
        want, ref = model(tokens[:, None], cache=ref)
        got = step(tokens, cache)
        torch.testing.assert_close(got, want[:, -1], rtol=1e-5, atol=2e-5)
        _assert_caches_close(cache, ref)
