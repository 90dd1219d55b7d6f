"""Fused single-token decoding on the CPU: the model's decode step with its small ops merged.

A decode step of a small model on a CPU spends most of its time between the matmuls: a
:class:`~griffon.model.Griffon` step at width 256 runs several hundred tensor ops of a few
microseconds each around 37 matmuls (docs/sampling.md). :class:`FusedDecoder` computes the same
step with

* the projections that share an input merged into one matrix (``linear_x | linear_y``,
  ``gate | up``, ``q | k | v``), stored transposed as ``(in, out)`` for ``x @ W``, and run by
  PyTorch (MKL) as before;
* everything between the matmuls in one numba kernel per stretch (:mod:`griffon.decode.kernels`).

It reads and updates the same :class:`~griffon.model.Cache` as the model's own step, which stays
the reference: ``tests/test_decode_steps.py`` compares the two step by step (logits and caches),
past the attention window, at rows in different positions and at document starts. Where a model
is outside what the kernels cover (not float32 on the CPU, LayerNorm), :meth:`FusedDecoder.reason`
says why and generation uses the model's step. RoPE frequencies, which cached keys a query sees
and the growth of a global cache come from :mod:`griffon.nn.attention`, as in the model's step.

Numerics: float32 throughout, as the model's float32 step; logits agree to about 1e-5, not bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from griffon.decode.kernels import PARALLEL, PARALLEL_MIN_ROWS, SERIAL
from griffon.model import BlockState, Cache, Griffon
from griffon.nn.attention import AttentionState, append_to_global_cache, inverse_frequencies
from griffon.nn.mlp import GatedMLP
from griffon.nn.moe import MoE
from griffon.nn.norms import RMSNorm
from griffon.nn.recurrent import RecurrentBlock, RecurrentState
from griffon.nn.rglru import RGLRU_C
from griffon.nn.visibility import visible_keys
from griffon.scan.cpu import match_torch_threads


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _gain(norm: RMSNorm) -> np.ndarray:
    return _np(norm.gain().detach().float())


def _transposed(*linears: nn.Linear) -> torch.Tensor:
    """The weights of ``linears`` side by side, as one contiguous (in, sum of outs) matrix."""
    return torch.cat([lin.weight.detach() for lin in linears]).t().contiguous()


def _bias(*linears: nn.Linear) -> torch.Tensor:
    return torch.cat([lin.bias.detach() for lin in linears])


@dataclass
class RecurrentWeights:
    """A recurrent block's weights as the fused step reads them."""

    w_in: torch.Tensor  # (D, 2L): linear_x (conv branch) | linear_y (GeLU branch), transposed
    b_in: torch.Tensor  # (2L,)
    conv_w: np.ndarray  # (K, L)
    conv_b: np.ndarray  # (L,)
    gate_w: torch.Tensor  # (H, L/H, 2 L/H): input gate | recurrence gate, per block
    gate_b: torch.Tensor  # (H, 1, 2 L/H)
    log_a_scale: np.ndarray  # (L,) -c softplus(a_param): log a_t = log_a_scale * r_t


@dataclass
class AttentionWeights:
    """An attention block's weights as the fused step reads them."""

    w_in: torch.Tensor  # (D, (H + 2 H_kv) hd): q | k | v, transposed
    inv_freq: np.ndarray  # (rope_dim / 2,)
    history: int | None  # the local window's reach; None for global attention


@dataclass
class LayerWeights:
    """One residual block: norms, the temporal block, its output projection and the MLP."""

    temporal_gain: np.ndarray  # (D,) 1 + scale of the temporal pre-norm
    channel_gain: np.ndarray  # (D,)
    temporal: RecurrentWeights | AttentionWeights
    w_out: torch.Tensor  # (L or H hd, D): the temporal block's output projection, transposed
    b_out: np.ndarray  # (D,)
    mlp_in: torch.Tensor | None  # (D, 2F): gate | up, transposed (None: a structured MLP)
    mlp_in_b: torch.Tensor | None  # (2F,)
    mlp_out: torch.Tensor | None  # (F, D)
    mlp_out_b: np.ndarray  # (D,); zeros for a structured MLP, whose forward adds its own bias
    mlp: nn.Module | None  # a structured MLP keeps its own forward (and its pre-merge rule)

    def matrices(self) -> list[torch.Tensor]:
        """The weight matrices the step multiplies by (for the sampling benchmark's matmul floor)."""
        mats = [self.temporal.w_in, self.w_out]
        return mats + [m for m in (self.mlp_in, self.mlp_out) if m is not None]


def _layer_weights(block: nn.Module, cfg) -> LayerWeights:
    t, mlp = block.temporal, block.mlp
    temporal: RecurrentWeights | AttentionWeights
    if isinstance(t, RecurrentBlock):
        gates = (t.rglru.input_gate, t.rglru.a_gate)
        temporal = RecurrentWeights(
            w_in=_transposed(t.linear_x, t.linear_y),
            b_in=_bias(t.linear_x, t.linear_y),
            conv_w=_np(t.conv.weight).copy(),
            conv_b=_np(t.conv.bias).copy(),
            gate_w=torch.cat([g.weight.detach() for g in gates], dim=-1),
            gate_b=torch.cat([g.bias.detach() for g in gates], dim=-1)[:, None, :].contiguous(),
            log_a_scale=_np(-RGLRU_C * F.softplus(t.rglru.a_param.detach())).copy(),
        )
        out = t.linear_out
    else:
        temporal = AttentionWeights(
            w_in=_transposed(t.q, t.k, t.v),
            inv_freq=_np(inverse_frequencies(cfg.rope_dim, cfg.rope_base)),
            history=t.history,
        )
        out = t.o
    # Structured and mixture-of-experts FFNs run as their own modules (a MoE's routing is per token).
    dense = isinstance(mlp, GatedMLP) and all(isinstance(p, nn.Linear) for p in (mlp.gate, mlp.up, mlp.down))
    return LayerWeights(
        temporal_gain=_gain(block.temporal_norm),
        channel_gain=_gain(block.channel_norm),
        temporal=temporal,
        w_out=_transposed(out),
        b_out=_np(out.bias).copy(),
        mlp_in=_transposed(mlp.gate, mlp.up) if dense else None,
        mlp_in_b=_bias(mlp.gate, mlp.up) if dense else None,
        mlp_out=_transposed(mlp.down) if dense else None,
        mlp_out_b=_np(mlp.down.bias).copy() if dense else np.zeros(cfg.width, np.float32),
        mlp=None if dense else mlp,
    )


class FusedDecoder:
    """The decode step of a float32 CPU :class:`~griffon.model.Griffon` with fused kernels.

    ``FusedDecoder(model).step(tokens, cache)`` equals ``model(tokens[:, None], cache=cache)``
    (logits to about 1e-5) and updates ``cache`` in place. The weights are copied, merged and
    transposed when the decoder is built: build a new one after changing the model.
    """

    def __init__(self, model: Griffon) -> None:
        reason = self.reason(model)
        if reason:
            raise ValueError(f"the fused decode step does not cover this model: {reason}")
        cfg = model.config
        self.config = cfg
        # Operands of PyTorch matmuls stay tensors; what only the kernels read is kept as numpy.
        self.embedding = model.embed.weight.detach().clone()  # (V, D)
        self.embed_scale = model.embed.scale
        self.head = self.embedding.t().contiguous()  # (D, V): the tied output head
        self.final_gain = _gain(model.final_norm)
        self.layers = [_layer_weights(block, cfg) for block in model.blocks]

    @staticmethod
    def reason(model: Griffon) -> str | None:
        """Why the fused step cannot run ``model`` (None if it can)."""
        weight = model.embed.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return f"it runs float32 on the CPU, the model is {weight.dtype} on {weight.device.type}"
        if not all(isinstance(b.temporal_norm, RMSNorm) for b in model.blocks):
            return "it implements RMSNorm only"
        cfg = model.config
        if not all(isinstance(b.mlp, GatedMLP | MoE) for b in model.blocks) or cfg.mlp_type != "geglu":
            return "it implements the GeGLU MLP only"
        if cfg.qkv_bias:
            return "it has no biases on the query, key and value projections"
        if not cfg.proj_bias or not cfg.tie_embeddings:
            return "it implements biased output projections and a tied output head only"
        return None

    def matrices(self) -> list[torch.Tensor]:
        """Every weight matrix a step multiplies by, the output head included."""
        return [m for layer in self.layers for m in layer.matrices()] + [self.head]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Consume one token per row (``tokens`` (B,)) and return the next logits (B, V)."""
        cfg = self.config
        seg = _np(cache.segment_pos)
        k = PARALLEL if tokens.shape[0] >= PARALLEL_MIN_ROWS and match_torch_threads() > 1 else SERIAL
        x = self.embedding[tokens] * self.embed_scale  # (B, D), a new tensor: the residual stream
        normed = torch.empty_like(x)
        delta, bias = np.empty((0, 0), np.float32), self.final_gain  # nothing to add before the first norm
        for i, layer in enumerate(self.layers):
            k.norm(_np(x), delta, bias, layer.temporal_gain, cfg.norm_eps, _np(normed))
            if isinstance(layer.temporal, RecurrentWeights):
                h = self._recurrent(k, layer.temporal, normed, cache.blocks[i], seg)
            else:
                h = self._attention(k, layer.temporal, normed, cache, i)
            delta = _np(h @ layer.w_out)  # (B, D)
            k.norm(_np(x), delta, layer.b_out, layer.channel_gain, cfg.norm_eps, _np(normed))
            if layer.mlp is not None:
                delta = _np(layer.mlp(normed))
            else:
                gate_up = torch.addmm(layer.mlp_in_b, normed, layer.mlp_in)  # (B, 2F)
                act = torch.empty(x.shape[0], gate_up.shape[1] // 2)
                k.geglu(_np(gate_up), _np(act))
                delta = _np(act @ layer.mlp_out)
            bias = layer.mlp_out_b
        k.norm(_np(x), delta, bias, self.final_gain, cfg.norm_eps, _np(normed))
        logits = normed @ self.head  # (B, V)
        if cfg.logit_soft_cap:
            k.soft_cap(_np(logits), np.float32(cfg.logit_soft_cap))
        cache.position += 1
        cache.segment_pos += 1
        return logits

    @staticmethod
    def _recurrent(k, w: RecurrentWeights, normed: torch.Tensor, state: BlockState, seg: np.ndarray) -> torch.Tensor:
        assert isinstance(state, RecurrentState)
        B = normed.shape[0]
        xy = torch.addmm(w.b_in, normed, w.w_in)  # (B, 2L): conv branch | GeLU branch
        conv = torch.empty(B, w.conv_b.shape[0])  # (B, L)
        k.conv(_np(xy), w.conv_w, w.conv_b, _np(state.conv), seg, _np(conv))
        H = w.gate_w.shape[0]
        # the input and recurrence gates of each block in one batched matmul: (H, B, 2 L/H)
        gates = torch.baddbmm(w.gate_b, conv.view(B, H, -1).transpose(0, 1), w.gate_w)
        out = torch.empty_like(conv)
        k.rglru(_np(gates), w.log_a_scale, _np(conv), _np(xy), seg, _np(state.rglru), _np(out))
        return out

    def _attention(self, k, w: AttentionWeights, normed: torch.Tensor, cache: Cache, i: int) -> torch.Tensor:
        state = cache.blocks[i]
        assert isinstance(state, AttentionState)
        cfg = self.config
        B = normed.shape[0]
        qkv = normed @ w.w_in  # (B, (H + 2 H_kv) hd)
        out = torch.empty(B, cfg.num_heads * cfg.resolved_head_dim)
        new_k = torch.empty(B, cfg.num_kv_heads, cfg.resolved_head_dim)
        new_v = torch.empty_like(new_k)
        position, seg = cache.position[:, None], cache.segment_pos[:, None]
        visible = visible_keys(state.positions, position, seg, w.history)  # (B, S)
        ring = w.history is not None and w.history > 0
        k.attention(_np(qkv), cfg.num_heads, cfg.num_kv_heads, w.inv_freq, _np(cache.segment_pos),
                    _np(cache.position), _np(state.keys), _np(state.values), _np(state.positions), _np(visible),
                    ring, _np(new_k), _np(new_v), _np(out))  # fmt: skip
        if w.history is None:  # global attention: the cache grows by one slot
            cache.blocks[i] = append_to_global_cache(state, new_k[:, None], new_v[:, None], position)
        return out
