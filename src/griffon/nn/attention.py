"""Local or global multi-query attention (MQA/GQA/MHA) with partial RoPE and document masking."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from griffon.nn.visibility import visible_keys

# Queries per attention call; blocks let local and causal attention skip keys they cannot see.
_QUERY_BLOCK = 128

# How a fresh chunk (no cache) is attended: ``blocks`` loops over query blocks with SDPA and a
# dense mask (any device); ``flex`` is FlexAttention with a block mask (nn/flex_attention.py);
# ``sdpa-causal`` is SDPA's causal flash kernel, for rows that are one document each with global
# attention (checked). ``auto``: ``flex`` on CUDA, ``blocks`` elsewhere.
ATTENTION_KERNELS = ("auto", "blocks", "flex", "sdpa-causal")


@dataclass
class AttentionState:
    """Decode cache of one attention block.

    Local attention keeps a ring buffer of the last ``history`` keys/values (slot = position % history),
    so its size is fixed; global attention (``history is None``) appends and grows.
    """

    keys: torch.Tensor  # (B, S, H_kv, head_dim)
    values: torch.Tensor  # (B, S, H_kv, head_dim)
    positions: torch.Tensor  # (B, S) stream position of each slot, -1 where empty


def inverse_frequencies(rope_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """(rope_dim / 2,) float32 RoPE frequencies ``base^(-2i / rope_dim)``, computed as both references do."""
    return 1.0 / base ** (torch.arange(rope_dim // 2, device=device, dtype=torch.float32) * 2 / rope_dim)


def rope_tables(segment_pos: torch.Tensor, rope_dim: int, base: float, dtype: torch.dtype):
    """sin and cos (B, T, 1, rope_dim / 2) of the RoPE angles, computed in float32 as both
    references do, then cast to ``dtype``."""
    inv_freq = inverse_frequencies(rope_dim, base, segment_pos.device)
    angles = segment_pos.to(torch.float32)[..., None, None] * inv_freq  # (B, T, 1, half)
    return torch.sin(angles).to(dtype), torch.cos(angles).to(dtype)


def append_to_global_cache(
    state: AttentionState, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> AttentionState:
    """A global-attention cache with new keys/values (B, T, H_kv, hd) at ``positions`` (B, T) appended."""
    return AttentionState(
        keys=torch.cat([state.keys, keys.to(state.keys.dtype)], dim=1),
        values=torch.cat([state.values, values.to(state.values.dtype)], dim=1),
        positions=torch.cat([state.positions, positions], dim=1),
    )


def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Rotate the first ``rope_dim`` dims of each head of x (B, T, H, hd) (rotate-half convention)."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rope_dim], x[..., rope_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class Attention(nn.Module):
    """Causal attention restricted to the same document and, if local, to ``history`` previous keys."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        history: int | None,
        rope_dim: int,
        rope_base: float,
        out_init_scale: float = 1.0,
        qkv_bias: bool = False,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.history = history
        self.rope_dim, self.rope_base = rope_dim, rope_base
        self.q = nn.Linear(width, num_heads * head_dim, bias=qkv_bias)
        self.k = nn.Linear(width, num_kv_heads * head_dim, bias=qkv_bias)
        self.v = nn.Linear(width, num_kv_heads * head_dim, bias=qkv_bias)
        self.o = nn.Linear(num_heads * head_dim, width, bias=out_bias)
        self.out_init_scale = out_init_scale
        self.kernel = "auto"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        width = self.q.in_features
        for lin in (self.q, self.k, self.v):
            nn.init.normal_(lin.weight, std=math.sqrt(1.0 / width))
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.o.weight, std=math.sqrt(self.out_init_scale / self.o.in_features))
        if self.o.bias is not None:
            nn.init.zeros_(self.o.bias)

    def init_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> AttentionState:
        slots = self.history if self.history is not None else 0
        shape = (batch, slots, self.num_kv_heads, self.head_dim)
        return AttentionState(
            keys=torch.zeros(shape, dtype=dtype, device=device),
            values=torch.zeros(shape, dtype=dtype, device=device),
            positions=torch.full((batch, slots), -1, dtype=torch.long, device=device),
        )

    def forward(
        self,
        x: torch.Tensor,
        segment_pos: torch.Tensor,
        positions: torch.Tensor,
        state: AttentionState | None,
        build_state: bool = True,
    ) -> tuple[torch.Tensor, AttentionState | None]:
        """Args:
        x: (B, T, D) inputs.
        segment_pos: (B, T) position inside the document (RoPE and document masking).
        positions: (B, T) position in the whole stream (window and causal masking, cache slots).
        state: cache from earlier chunks (a local ring buffer is written in place); None for a fresh sequence.
        build_state: with ``state=None``, whether to build a cache from this chunk (training skips it).
        """
        B, T, _ = x.shape
        q = self.q(x).unflatten(-1, (self.num_heads, self.head_dim))  # (B, T, H, hd)
        k = self.k(x).unflatten(-1, (self.num_kv_heads, self.head_dim))  # (B, T, H_kv, hd)
        v = self.v(x).unflatten(-1, (self.num_kv_heads, self.head_dim))  # (B, T, H_kv, hd)
        if self.rope_dim:
            sin, cos = rope_tables(segment_pos, self.rope_dim, self.rope_base, q.dtype)
            q, k = rotate(q, sin, cos, self.rope_dim), rotate(k, sin, cos, self.rope_dim)
        if T == 1 and state is not None:
            return self._decode_step(q, k, v, segment_pos, positions, state)

        # Queries go in blocks: each block needs only the keys inside its reach (the window, or
        # everything up to the block's end for global attention), so masked-out work shrinks
        # from T^2 to about T * (history + block). Cached keys (ring or history) come first.
        qt = q.transpose(1, 2)  # (B, H, T, hd)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, T, hd)
        kernel = self.kernel if self.kernel != "auto" else ("flex" if x.is_cuda else "blocks")
        if state is None and kernel != "blocks":
            out = self._attend_fused(qt, kt, vt, segment_pos, positions, kernel)
            out = self.o(out.transpose(1, 2).flatten(2))
            return out, None if not build_state else self._update_state(None, k, v, positions)
        if state is not None:
            old_k, old_v = state.keys.to(k.dtype).transpose(1, 2), state.values.to(v.dtype).transpose(1, 2)
        outs = []
        for s in range(0, T, _QUERY_BLOCK):
            e = min(T, s + _QUERY_BLOCK)
            lo = 0 if self.history is None else max(0, s - self.history)
            keys, values, key_pos = kt[:, :, lo:e], vt[:, :, lo:e], positions[:, lo:e]
            if state is not None:
                keys, values = torch.cat([old_k, keys], dim=2), torch.cat([old_v, values], dim=2)
                key_pos = torch.cat([state.positions, key_pos], dim=1)
            outs.append(self._attend(qt[:, :, s:e], keys, values, positions[:, s:e], segment_pos[:, s:e], key_pos))
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (B, H, T, hd)
        out = self.o(out.transpose(1, 2).flatten(2))

        if state is None and not build_state:
            return out, None
        return out, self._update_state(state, k, v, positions)

    def _decode_step(
        self, q, k, v, segment_pos, positions, state: AttentionState
    ) -> tuple[torch.Tensor, AttentionState]:
        """One new token per row (q (B, 1, H, hd), k and v (B, 1, H_kv, hd), rotated) against the
        cache, without concatenating the cache's keys: the new key's score joins the cached ones
        only inside the softmax. Same masks as ``_attend``."""
        B = q.shape[0]
        Hkv, g, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        qg = q.view(B, Hkv, g, hd) * hd**-0.5  # heads grouped by the key/value head they share
        keys = state.keys.to(q.dtype).permute(0, 2, 3, 1)  # (B, H_kv, hd, S)
        values = state.values.to(q.dtype).transpose(1, 2)  # (B, H_kv, S, hd)
        kp, qp, seg = state.positions[:, None, None, :], positions[:, :, None, None], segment_pos[:, :, None, None]
        visible = visible_keys(kp, qp, seg, self.history)  # (B, 1, 1, S)
        # Scores and softmax in float32 for bf16/fp16/fp32 inputs (float64 for float64), as SDPA does.
        acc = torch.promote_types(q.dtype, torch.float32)
        old = torch.matmul(qg, keys).to(acc).masked_fill(~visible, float("-inf"))  # (B, H_kv, g, S)
        new = (qg * k.view(B, Hkv, 1, hd)).sum(-1, keepdim=True).to(acc)  # (B, H_kv, g, 1): always visible
        p = torch.cat([old, new], dim=-1).softmax(-1).to(q.dtype)
        S = old.shape[-1]
        out = torch.matmul(p[..., :S], values) + p[..., S:] * v.view(B, Hkv, 1, hd)  # (B, H_kv, g, hd)
        return self.o(out.reshape(B, 1, self.num_heads * hd)), self._update_state(state, k, v, positions)

    def _attend(self, q, keys, values, q_pos, q_seg, key_pos) -> torch.Tensor:
        """q (B, H, t, hd); keys/values (B, H_kv, s, hd); q_pos, q_seg (B, t); key_pos (B, s)."""
        mask = visible_keys(key_pos[:, None, :], q_pos[:, :, None], q_seg[:, :, None], self.history)  # (B, t, s)
        # SDPA keeps the softmax in float32 for float32 inputs; its fused CPU/GPU kernels also
        # accumulate bf16 inputs in float32.
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None], scale=self.head_dim**-0.5,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # fmt: skip

    def _attend_fused(self, q, k, v, segment_pos, positions, kernel: str) -> torch.Tensor:
        """A fresh chunk's attention in one fused kernel: q (B, H, T, hd), k and v (B, H_kv, T, hd)."""
        if kernel == "flex":
            from griffon.nn.flex_attention import flex_attend  # imported here: FlexAttention loads compile machinery

            return flex_attend(q, k, v, segment_pos, self.history, self.head_dim**-0.5)
        if kernel != "sdpa-causal":
            raise ValueError(f"unknown attention kernel {kernel!r}; known: {ATTENTION_KERNELS}")
        if self.history is not None or not torch.equal(segment_pos, positions):
            raise ValueError("the sdpa-causal attention kernel needs global attention and one document per row")
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.head_dim**-0.5, enable_gqa=self.num_kv_heads != self.num_heads
        )

    def _update_state(self, state, k, v, positions) -> AttentionState:
        if self.history is None:  # global attention: the cache is everything seen so far
            if state is None:
                return AttentionState(keys=k, values=v, positions=positions)
            return append_to_global_cache(state, k, v, positions)
        if state is None:
            state = self.init_state(k.shape[0], k.dtype, k.device)
        if self.history == 0:
            return state
        n = min(k.shape[1], self.history)  # only the last `history` new keys can ever be attended to
        slots = positions[:, -n:] % self.history  # (B, n)
        idx = slots[:, :, None, None].expand(-1, -1, k.shape[2], k.shape[3])
        state.keys.scatter_(1, idx, k[:, -n:].to(state.keys.dtype))
        state.values.scatter_(1, idx, v[:, -n:].to(state.values.dtype))
        state.positions.scatter_(1, slots, positions[:, -n:])
        return state
