"""Fast scan backends against the float64 reference: values and gradients, odd shapes, resets."""

import os
import subprocess
import sys

import pytest
import torch

from griffon.scan import linear_scan, linear_scan_reference

SHAPES = [(1, 1, 1), (2, 7, 5), (3, 37, 129), (1, 64, 300), (4, 3, 2)]


def _inputs(shape, dtype, seed, reset_p=0.15):
    g = torch.Generator().manual_seed(seed)
    B, T, D = shape
    a = torch.rand(B, T, D, generator=g, dtype=torch.float64)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    reset = torch.rand(B, T, generator=g) < reset_p
    return [t.to(dtype).requires_grad_() for t in (a, x, h0)] + [reset]


def _value_and_grads(fn, a, x, h0, reset, seed):
    h, last = fn(a, x, h0, reset)
    g = torch.Generator().manual_seed(seed + 100)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    gl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(h.dtype)
    grads = torch.autograd.grad((h * gh).sum() + (last * gl).sum(), [a, x, h0])
    return [h, last, *grads]


@pytest.mark.parametrize("backend", ["cpu", "loop"])
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_equals_reference(backend, shape):
    for seed in range(2):
        a, x, h0, reset = _inputs(shape, torch.float64, seed)
        want = _value_and_grads(linear_scan_reference, a, x, h0, reset, seed)
        got = _value_and_grads(lambda *args: linear_scan(*args, backend=backend), a, x, h0, reset, seed)
        for w, o, name in zip(want, got, ["h", "h_last", "da", "dx", "dh0"], strict=True):
            assert torch.allclose(o, w, rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("backend", ["cpu", "loop"])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_close_to_float64_reference(backend, shape):
    a, x, h0, reset = _inputs(shape, torch.float64, 3)
    want = _value_and_grads(linear_scan_reference, a, x, h0, reset, 3)
    a32, x32, h032 = (t.detach().float().requires_grad_() for t in (a, x, h0))
    got = _value_and_grads(lambda *args: linear_scan(*args, backend=backend), a32, x32, h032, reset, 3)
    for w, o in zip(want, got, strict=True):
        assert o.dtype == torch.float32
        assert torch.allclose(o.double(), w, rtol=1e-5, atol=1e-5)


def test_reset_drops_state_and_h0_defaults_to_zero():
    a = torch.full((1, 4, 2), 0.5)
    x = torch.ones(1, 4, 2)
    reset = torch.tensor([[False, False, True, False]])
    h, last = linear_scan(a, x, None, reset)
    assert h[0, :, 0].tolist() == [1.0, 1.5, 1.0, 1.5]
    assert last[0, 0].item() == 1.5


def test_only_final_state_gradient():
    a, x, h0, reset = _inputs((2, 9, 3), torch.float64, 0)
    ga = torch.autograd.grad(linear_scan(a, x, h0, reset, backend="cpu")[1].sum(), [a, x, h0])
    gr = torch.autograd.grad(linear_scan_reference(a, x, h0, reset)[1].sum(), [a, x, h0])
    for p, q in zip(ga, gr, strict=True):
        assert torch.allclose(p, q)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(a=torch.rand(2, 3, 4), x=torch.rand(2, 3, 5)), "equal shape"),
        (dict(a=torch.rand(2, 3, 4).bfloat16(), x=torch.rand(2, 3, 4).bfloat16()), "float32 or float64"),
        (dict(a=torch.rand(2, 3, 4), x=torch.rand(2, 3, 4), h0=torch.rand(2, 5)), "h0 must be"),
        (dict(a=torch.rand(2, 3, 4), x=torch.rand(2, 3, 4), reset=torch.zeros(2, 3)), "reset must be"),
        (dict(a=torch.rand(2, 3, 4), x=torch.rand(2, 3, 4), backend="nope"), "unknown scan backend"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        linear_scan(**kwargs)


def test_single_step_fast_path_equals_reference():
    a, x, h0, _ = _inputs((3, 1, 7), torch.float64, 4)
    for reset in (torch.tensor([[True], [False], [False]]), None):
        want = _value_and_grads(linear_scan_reference, a, x, h0, reset, 4)
        got = _value_and_grads(linear_scan, a, x, h0, reset, 4)
        for w, o in zip(want, got, strict=True):
            assert torch.allclose(o, w, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to tell one thread from all")
def test_the_cpu_scan_keeps_the_thread_count_torch_was_given():
    """Numba's OpenMP pool, started on first use, used to set the process's OpenMP thread count to
    every CPU: a process told OMP_NUM_THREADS=1 ran torch on all of them after its first scan."""
    code = (
        "import torch, numba\n"
        "from griffon.scan.cpu import linear_scan_cpu\n"
        "a = torch.rand(2, 8, 4, requires_grad=True)\n"
        "h, _ = linear_scan_cpu(a, torch.rand(2, 8, 4), torch.zeros(2, 4), torch.zeros(2, 8, dtype=torch.bool))\n"
        "h.sum().backward()\n"
        "before = (torch.get_num_threads(), numba.get_num_threads())\n"
        "torch.set_num_threads(2)\n"
        "linear_scan_cpu(a, torch.rand(2, 8, 4), torch.zeros(2, 4), torch.zeros(2, 8, dtype=torch.bool))\n"
        "print(*before, torch.get_num_threads(), numba.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1", "2", "2"]  # one thread as told, then two as set, numba following torch
