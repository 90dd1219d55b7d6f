"""The numba kernels of the fused CPU decode step (:mod:`griffon.decode.fused`).

Everything between a decode step's matmuls, for one token per row: residual add + bias +
RMSNorm; the Conv1D step; the RG-LRU step with the GeLU branch's product; the GeGLU; the
attention of one query against the cache, RoPE and the ring-buffer write included; the logit
soft cap. Each kernel is written for one batch row and compiled twice over the rows, serially
and in parallel (:data:`SERIAL`, :data:`PARALLEL`).

Numerics: float32 throughout; the kernels sum in a different order than PyTorch (and take
sin/cos from libm), so results agree with the model's step to about 1e-5, not bitwise.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numba
import numpy as np

# Reassociation lets LLVM vectorise the reductions; no nnan/ninf, so masks and infinities stay exact.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_GELU_C = math.sqrt(2.0 / math.pi)
# 2^-n for the exponential below: a table lookup vectorises where libm's expf and ldexpf do not.
_POW2_NEG = np.array([2.0**-n for n in range(128)], dtype=np.float32)


# The transcendental functions are written out because numba would call libm for each element
# (15-20 ns each, scalar), which made the kernels slower than PyTorch's vectorised ones at large batch.
@numba.njit(inline="always", fastmath=_FAST)
def _exp_neg(x):  # pragma: no cover - compiled
    """exp(x) for x <= 0, to 3e-7 relative (Cephes' expf: x = n ln2 + r, a degree-7 polynomial in r).

    NaN gives NaN; x below -87, where exp(x) is subnormal or underflows, gives 0; x > 0, which no
    caller passes, is taken as 0. The clamps keep the table index in range for every float.
    """
    if x != x:  # NaN: the comparisons below would all be false and the index undefined
        return x
    if x < np.float32(-87.0):
        return np.float32(0.0)
    x = min(x, np.float32(0.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1.0)) * _POW2_NEG[-np.int32(n)]


@numba.njit(inline="always", fastmath=_FAST)
def _tanh(x):  # pragma: no cover - compiled
    """tanh(x) to 3e-7 absolute: Eigen's rational approximation for float32 (odd degree 13 over even
    degree 6) for |x| < 7.9; beyond, where that saturates early, (1 - e) / (1 + e) with e = exp(-2|x|)."""
    if abs(x) >= np.float32(7.90531110763549805):
        e = _exp_neg(np.float32(-2.0) * abs(x))
        t = (np.float32(1.0) - e) / (np.float32(1.0) + e)
        return t if x > 0 else -t
    x2 = x * x
    p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = x2 * p + np.float32(-8.60467152213735e-11)
    p = x2 * p + np.float32(5.12229709037114e-08)
    p = x2 * p + np.float32(1.48572235717979e-05)
    p = x2 * p + np.float32(6.37261928875436e-04)
    p = x2 * p + np.float32(4.89352455891786e-03)
    q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = x2 * q + np.float32(2.26843463243900e-03)
    q = x2 * q + np.float32(4.89352518554385e-03)
    return x * p / q


@numba.njit(inline="always", fastmath=_FAST)
def _sigmoid(x):  # pragma: no cover - compiled
    e = _exp_neg(-abs(x))
    return np.float32(1.0) / (np.float32(1.0) + e) if x >= 0 else e / (np.float32(1.0) + e)


@numba.njit(inline="always", fastmath=_FAST)
def _gelu_tanh(x):  # pragma: no cover - compiled
    return np.float32(0.5) * x * (np.float32(1.0) + _tanh(np.float32(_GELU_C) * (x + np.float32(0.044715) * x * x * x)))


# Each kernel is written for one batch row (``*_row``, inlined) and compiled twice over the rows:
# serially, and in parallel with prange. Launching a parallel region costs about as much as the
# work at batch 1 (a Griffin step: 2.8-3.1 ms with serial kernels, 3.0-3.3 with parallel ones).


@numba.njit(inline="always", fastmath=_FAST)
def _residual_norm_row(b, x, delta, bias, gain, eps, out):  # pragma: no cover - compiled
    """x (B, D) += delta + bias, in place; out = RMSNorm(x) * gain. A (0, 0) delta adds nothing."""
    D = x.shape[1]
    add = delta.shape[0] > 0
    xb = x[b]
    if add:
        db = delta[b]
        for d in range(D):
            xb[d] += db[d] + bias[d]
    s = np.float32(0.0)
    for d in range(D):
        s += xb[d] * xb[d]
    r = np.float32(1.0) / np.sqrt(s / np.float32(D) + eps)
    ob = out[b]
    for d in range(D):
        ob[d] = xb[d] * r * gain[d]


@numba.njit(cache=True, fastmath=_FAST)
def _residual_norm(x, delta, bias, gain, eps, out):  # pragma: no cover - compiled
    for b in range(x.shape[0]):
        _residual_norm_row(b, x, delta, bias, gain, eps, out)


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _residual_norm_parallel(x, delta, bias, gain, eps, out):  # pragma: no cover - compiled
    for b in numba.prange(x.shape[0]):
        _residual_norm_row(b, x, delta, bias, gain, eps, out)


@numba.njit(inline="always", fastmath=_FAST)
def _conv_step_row(b, xy, w, bias, state, segment_pos, out):  # pragma: no cover - compiled
    """Conv1D for one token. xy (B, 2L): the conv input is xy[:, :L]. w (K, L), w[K-1] multiplies
    the new input; state (B, K-1, L) the previous inputs, oldest first, shifted in place. A tap
    ``lag`` tokens back counts only if it lies in the token's document (lag <= segment_pos)."""
    K, L = w.shape
    u, ob, sb = xy[b, :L], out[b], state[b]
    for c in range(L):
        ob[c] = bias[c] + w[K - 1, c] * u[c]
    for j in range(K - 1):
        if K - 1 - j <= segment_pos[b]:
            for c in range(L):
                ob[c] += w[j, c] * sb[j, c]
    for j in range(K - 2):
        sb[j, :] = sb[j + 1, :]
    if K > 1:
        sb[K - 2, :] = u


@numba.njit(cache=True, fastmath=_FAST)
def _conv_step(xy, w, bias, state, segment_pos, out):  # pragma: no cover - compiled
    for b in range(xy.shape[0]):
        _conv_step_row(b, xy, w, bias, state, segment_pos, out)


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _conv_step_parallel(xy, w, bias, state, segment_pos, out):  # pragma: no cover - compiled
    for b in numba.prange(xy.shape[0]):
        _conv_step_row(b, xy, w, bias, state, segment_pos, out)


@numba.njit(inline="always", fastmath=_FAST)
def _rglru_step_row(b, gates, log_a_scale, x, xy, segment_pos, h, out):  # pragma: no cover - compiled
    """RG-LRU for one token times the GeLU branch. gates (H, B, 2o): the pre-sigmoid input gate
    then recurrence gate of each block; log_a_scale (L,) = -8 softplus(a_param); x (B, L) the conv
    output; the GeLU branch is xy[:, L:]; h (B, L) the state, updated in place; out = h * gelu(y)."""
    H, _, two_o = gates.shape
    o = two_o // 2
    L = H * o
    for k in range(H):
        g, lo = gates[k, b], k * o
        # row views let LLVM prove the rows disjoint and vectorise
        xb, hb, yb, ob, scale = (
            x[b, lo : lo + o],
            h[b, lo : lo + o],
            xy[b, L + lo : L + lo + o],
            out[b, lo : lo + o],
            log_a_scale[lo : lo + o],
        )
        if segment_pos[b] == 0:  # a document starts: no carried state, multiplier 1
            for j in range(o):
                hb[j] = _sigmoid(g[j]) * xb[j]
        else:
            for j in range(o):
                a = _exp_neg(scale[j] * _sigmoid(g[o + j]))
                hb[j] = a * hb[j] + np.sqrt(np.float32(1.0) - a * a) * _sigmoid(g[j]) * xb[j]
        for j in range(o):
            ob[j] = hb[j] * _gelu_tanh(yb[j])


@numba.njit(cache=True, fastmath=_FAST)
def _rglru_step(gates, log_a_scale, x, xy, segment_pos, h, out):  # pragma: no cover - compiled
    for b in range(gates.shape[1]):
        _rglru_step_row(b, gates, log_a_scale, x, xy, segment_pos, h, out)


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _rglru_step_parallel(gates, log_a_scale, x, xy, segment_pos, h, out):  # pragma: no cover - compiled
    for b in numba.prange(gates.shape[1]):
        _rglru_step_row(b, gates, log_a_scale, x, xy, segment_pos, h, out)


@numba.njit(inline="always", fastmath=_FAST)
def _geglu_row(b, gate_up, out):  # pragma: no cover - compiled
    """out (B, F) = gelu(gate) * up for gate_up (B, 2F) = [gate | up]."""
    F = out.shape[1]
    for f in range(F):
        out[b, f] = _gelu_tanh(gate_up[b, f]) * gate_up[b, F + f]


@numba.njit(cache=True, fastmath=_FAST)
def _geglu(gate_up, out):  # pragma: no cover - compiled
    for b in range(out.shape[0]):
        _geglu_row(b, gate_up, out)


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _geglu_parallel(gate_up, out):  # pragma: no cover - compiled
    for b in numba.prange(out.shape[0]):
        _geglu_row(b, gate_up, out)


@numba.njit(inline="always", fastmath=_FAST)
def _attention_step_row(b, qkv, num_heads, num_kv_heads, inv_freq, segment_pos, position, keys, values, key_pos, visible, write, new_k, new_v, out):  # fmt: skip  # pragma: no cover - compiled
    """One query per row against its cache, then (if ``write``) the new key/value into its ring slot.

    qkv (B, (H + 2 H_kv) hd) = [q | k | v]; RoPE (rotate-half) turns the first ``2 len(inv_freq)``
    dims of each q and k head by ``segment_pos`` x inv_freq. keys/values (B, S, H_kv, hd), key_pos
    (B, S) (-1: empty); visible (B, S) says which cached keys the query sees
    (:func:`griffon.nn.visibility.visible_keys`); the new key always is. Softmax in float32 with
    the maximum subtracted, as SDPA. out (B, H hd).
    """
    S = keys.shape[1]
    hd = keys.shape[3]
    half = inv_freq.shape[0]
    g = num_heads // num_kv_heads
    scale = np.float32(1.0 / np.sqrt(hd))
    pos, seg = position[b], segment_pos[b]
    cos, sin = np.empty(half, np.float32), np.empty(half, np.float32)
    for i in range(half):
        angle = np.float32(seg) * inv_freq[i]
        cos[i], sin[i] = np.cos(angle), np.sin(angle)
    # rotated copies of this row's q (H heads) and new k (H_kv heads); v as it is
    q = qkv[b, : num_heads * hd].copy().reshape(num_heads, hd)
    k = qkv[b, num_heads * hd : (num_heads + num_kv_heads) * hd].copy().reshape(num_kv_heads, hd)
    v = qkv[b, (num_heads + num_kv_heads) * hd :].reshape(num_kv_heads, hd)
    for t in (q, k):
        for n in range(t.shape[0]):
            for i in range(half):
                x1, x2 = t[n, i], t[n, half + i]
                t[n, i] = x1 * cos[i] - x2 * sin[i]
                t[n, half + i] = x2 * cos[i] + x1 * sin[i]
    vis = visible[b]
    q *= scale  # as the model: the query is scaled before both products
    probs = np.empty((g, S + 1), np.float32)  # slot S: the new key
    # the g query heads sharing a key/value head go together: each cached key is read once
    for kv in range(num_kv_heads):
        qs = q[kv * g : (kv + 1) * g]
        for n in range(g):
            dot = np.float32(0.0)
            for i in range(hd):
                dot += qs[n, i] * k[kv, i]
            probs[n, S] = dot
        for s in range(S):
            if vis[s]:
                ks = keys[b, s, kv]
                for n in range(g):
                    dot = np.float32(0.0)
                    for i in range(hd):
                        dot += qs[n, i] * ks[i]
                    probs[n, s] = dot
        for n in range(g):
            top = probs[n, S]
            for s in range(S):
                if vis[s]:
                    top = max(top, probs[n, s])
            total = np.float32(0.0)
            for s in range(S + 1):
                e = _exp_neg(probs[n, s] - top) if s == S or vis[s] else np.float32(0.0)
                probs[n, s] = e
                total += e
            for s in range(S + 1):
                probs[n, s] /= total
        ob = out[b, kv * g * hd : (kv + 1) * g * hd].reshape(g, hd)
        for n in range(g):
            for i in range(hd):
                ob[n, i] = probs[n, S] * v[kv, i]
        for s in range(S):
            if vis[s]:
                vs = values[b, s, kv]
                for n in range(g):
                    p = probs[n, s]
                    for i in range(hd):
                        ob[n, i] += p * vs[i]
    new_k[b] = k
    new_v[b] = v
    if write:
        slot = pos % S
        keys[b, slot] = k
        values[b, slot] = v
        key_pos[b, slot] = pos


@numba.njit(cache=True, fastmath=_FAST)
def _attention_step(qkv, num_heads, num_kv_heads, inv_freq, segment_pos, position, keys, values, key_pos, visible, write, new_k, new_v, out):  # fmt: skip  # pragma: no cover - compiled
    for b in range(qkv.shape[0]):
        _attention_step_row(b, qkv, num_heads, num_kv_heads, inv_freq, segment_pos, position, keys, values, key_pos, visible, write, new_k, new_v, out)  # fmt: skip


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _attention_step_parallel(qkv, num_heads, num_kv_heads, inv_freq, segment_pos, position, keys, values, key_pos, visible, write, new_k, new_v, out):  # fmt: skip  # pragma: no cover - compiled
    for b in numba.prange(qkv.shape[0]):
        _attention_step_row(b, qkv, num_heads, num_kv_heads, inv_freq, segment_pos, position, keys, values, key_pos, visible, write, new_k, new_v, out)  # fmt: skip


@numba.njit(inline="always", fastmath=_FAST)
def _soft_cap_row(b, logits, cap):  # pragma: no cover - compiled
    """logits = tanh(logits / cap) * cap, in place."""
    V = logits.shape[1]
    for v in range(V):
        logits[b, v] = _tanh(logits[b, v] / cap) * cap


@numba.njit(cache=True, fastmath=_FAST)
def _soft_cap(logits, cap):  # pragma: no cover - compiled
    for b in range(logits.shape[0]):
        _soft_cap_row(b, logits, cap)


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _soft_cap_parallel(logits, cap):  # pragma: no cover - compiled
    for b in numba.prange(logits.shape[0]):
        _soft_cap_row(b, logits, cap)


SERIAL = SimpleNamespace(norm=_residual_norm, conv=_conv_step, rglru=_rglru_step, geglu=_geglu,
                          attention=_attention_step, soft_cap=_soft_cap)  # fmt: skip
PARALLEL = SimpleNamespace(norm=_residual_norm_parallel, conv=_conv_step_parallel, rglru=_rglru_step_parallel,
                            geglu=_geglu_parallel, attention=_attention_step_parallel, soft_cap=_soft_cap_parallel)  # fmt: skip
# Batches from this size on use the parallel kernels (on 2 cores, parallel was as fast or faster from 16 rows on).
PARALLEL_MIN_ROWS = 8
