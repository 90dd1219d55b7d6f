"""The Griffin-family language model: residual blocks over a temporal mixer and a gated MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from griffon.config import ModelConfig
from griffon.nn.attention import ATTENTION_KERNELS, Attention, AttentionState
from griffon.nn.embedding import Embedding
from griffon.nn.mlp import make_mlp
from griffon.nn.moe import MoE
from griffon.nn.norms import make_norm
from griffon.nn.recurrent import RecurrentBlock, RecurrentState
from griffon.nn.rglru import BlockDiagonalLinear
from griffon.nn.structured import StructuredLinear
from griffon.packing import segment_pos_from_cu_seqlens

BlockState = RecurrentState | AttentionState


@dataclass
class Cache:
    """Decode state of a whole model.

    Recurrent blocks and local attention hold a fixed amount per sequence; global attention grows.
    ``position`` counts the tokens each row has consumed; ``segment_pos`` is the next token's
    position inside its document (the default when the caller gives none).
    """

    blocks: list[BlockState]
    position: torch.Tensor  # (B,) long
    segment_pos: torch.Tensor  # (B,) long

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    @classmethod
    def stack(cls, caches: list[Cache]) -> Cache:
        """Join single-sequence caches into one batch. Rows may sit at different positions; global
        attention caches of different lengths are padded with empty slots (position -1, masked)."""
        blocks: list[BlockState] = []
        for states in zip(*(c.blocks for c in caches), strict=True):
            first = states[0]
            if isinstance(first, RecurrentState):
                blocks.append(RecurrentState(torch.cat([s.rglru for s in states]), torch.cat([s.conv for s in states])))
                continue
            slots = max(s.keys.shape[1] for s in states)

            def pad(t: torch.Tensor, value: float, slots: int = slots) -> torch.Tensor:
                widths = [0, 0] * (t.dim() - 2) + [0, slots - t.shape[1]]
                return torch.nn.functional.pad(t, widths, value=value)

            blocks.append(
                AttentionState(
                    keys=torch.cat([pad(s.keys, 0.0) for s in states]),
                    values=torch.cat([pad(s.values, 0.0) for s in states]),
                    positions=torch.cat([pad(s.positions, -1) for s in states]),
                )
            )
        return cls(
            blocks=blocks,
            position=torch.cat([c.position for c in caches]),
            segment_pos=torch.cat([c.segment_pos for c in caches]),
        )

    def advance_to(self, new: Cache) -> None:
        """Take ``new``'s state (the cache a forward returned) into this object, so that whoever
        holds this cache sees it advance."""
        self.blocks, self.position, self.segment_pos = new.blocks, new.position, new.segment_pos

    def clone(self) -> Cache:
        """A copy sharing no storage with this cache: advancing one leaves the other as it was."""
        return self.select(torch.arange(self.batch_size, device=self.position.device))

    def select(self, rows: torch.Tensor) -> Cache:
        """The cache of the sequences ``rows`` (a 1-D index tensor), in that order."""
        blocks: list[BlockState] = []
        for s in self.blocks:
            if isinstance(s, RecurrentState):
                blocks.append(RecurrentState(s.rglru[rows], s.conv[rows]))
            else:
                blocks.append(AttentionState(keys=s.keys[rows], values=s.values[rows], positions=s.positions[rows]))
        return Cache(blocks=blocks, position=self.position[rows], segment_pos=self.segment_pos[rows])

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the cache, in a fixed order (positions first, then each block's states)."""
        out = [self.position, self.segment_pos]
        for s in self.blocks:
            out += [s.rglru, s.conv] if isinstance(s, RecurrentState) else [s.keys, s.values, s.positions]
        return out

    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        return sum(t.nbytes for t in self.tensors())


class ResidualBlock(nn.Module):
    """Pre-norm residual block: ``r = x + temporal(norm(x))``; ``out = r + mlp(norm(r))``."""

    def __init__(self, cfg: ModelConfig, block_type: str, layer: int = 0) -> None:
        super().__init__()
        # Output projections start smaller in deeper models (the references' 2/num_layers).
        out_scale = 2.0 / cfg.num_layers
        self.temporal_norm = make_norm(cfg.norm_type, cfg.width, cfg.norm_eps, cfg.norm_unit_offset)
        if block_type == "recurrent":
            self.temporal: RecurrentBlock | Attention = RecurrentBlock(
                cfg.width, cfg.resolved_lru_width, cfg.resolved_lru_num_blocks, cfg.conv_width, out_scale
            )
        else:
            self.temporal = Attention(
                cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                cfg.attention_history, cfg.rope_dim, cfg.rope_base, out_scale, cfg.qkv_bias, cfg.proj_bias,
            )  # fmt: skip
        self.channel_norm = make_norm(cfg.norm_type, cfg.width, cfg.norm_eps, cfg.norm_unit_offset)
        structure = cfg.ffn_structure_of(layer)
        self.mlp: nn.Module
        if cfg.moe.enabled:
            self.mlp = MoE(cfg.moe, cfg.mlp_type, cfg.width, cfg.resolved_expert_width, out_scale, structure,
                           cfg.proj_bias)  # fmt: skip
        else:
            self.mlp = make_mlp(cfg.mlp_type, cfg.width, cfg.resolved_mlp_width, out_scale, structure, cfg.proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        segment_pos: torch.Tensor,
        positions: torch.Tensor,
        state: BlockState | None,
        build_state: bool,
    ) -> tuple[torch.Tensor, BlockState | None]:
        if isinstance(self.temporal, Attention):
            h, state = self.temporal(self.temporal_norm(x), segment_pos, positions, state, build_state)
        else:
            h, state = self.temporal(self.temporal_norm(x), segment_pos, positions, state)
        r = x + h
        return r + self.mlp(self.channel_norm(r)), state


class Griffon(nn.Module):
    """A Hawk, Griffin or MQA-transformer language model, chosen by ``config.block_pattern``.

    ``model(tokens, segment_pos=None, cache=None) -> (logits, cache)``. ``segment_pos == 0`` starts
    a document: the recurrence, the convolution and attention do not look across it. A cache
    from :meth:`init_cache` (or a previous call) continues a sequence with a chunk of any length.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = Embedding(config.vocab_size, config.width, config.embed_scale)
        self.blocks = nn.ModuleList(ResidualBlock(config, t, i) for i, t in enumerate(config.block_types))
        self.final_norm = make_norm(config.norm_type, config.width, config.norm_eps, config.norm_unit_offset)
        # An untied head starts as the embedding's scale (N(0, 1/width)), as the tied one is.
        self.head = None if config.tie_embeddings else Embedding(config.vocab_size, config.width, False)
        if config.init == "gpt2":
            init_gpt2_(self, config.init_std)

    def init_cache(
        self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Cache:
        """An empty cache for ``batch_size`` sequences."""
        dtype = dtype or self.embed.weight.dtype
        device = torch.device(device) if device is not None else self.embed.weight.device
        return Cache(
            blocks=[b.temporal.init_state(batch_size, dtype, device) for b in self.blocks],
            position=torch.zeros(batch_size, dtype=torch.long, device=device),
            segment_pos=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def forward(
        self,
        tokens: torch.Tensor,
        segment_pos: torch.Tensor | None = None,
        cache: Cache | None = None,
        return_cache: bool = False,
        last_only: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Cache | None]:
        """Args:
            tokens: (B, T) token ids.
            segment_pos: (B, T) position of each token inside its document; 0 starts a document.
                Default: one document continuing the cache (or starting at 0).
            cache: state to continue from. Continue with the returned cache: this one is consumed (its
                local-attention buffers are written in place, its other states replaced).
            return_cache: with ``cache=None``, also build and return the cache after this chunk.
            last_only: compute the logits of the last position only, (B, 1, V): a prefill needs no
                others, and with a large vocabulary the output layer is much of a token's cost.
            cu_seqlens: (N+1,) offsets of N documents packed in tokens (1, total), flash-attention's
                convention, instead of ``segment_pos`` (:mod:`griffon.packing` converts between them).

        Returns:
            logits (B, T, V) in the compute dtype, and the cache (None if neither asked nor given).
        """
        if cu_seqlens is not None:
            if segment_pos is not None or cache is not None or tokens.dim() != 2 or tokens.shape[0] != 1:
                raise ValueError("cu_seqlens describes a fresh packed stream (1, total): give no segment_pos or cache")
            segment_pos = segment_pos_from_cu_seqlens(cu_seqlens, tokens.shape[1])
        B, T = self._check_inputs(tokens, segment_pos, cache)
        steps = torch.arange(T, device=tokens.device)
        if cache is None:
            positions = steps.expand(B, T)
            if segment_pos is None:
                segment_pos = positions
        else:
            positions = cache.position[:, None] + steps
            if segment_pos is None:
                segment_pos = cache.segment_pos[:, None] + steps

        x = self.embed.encode(tokens)  # (B, T, D)
        build = cache is not None or return_cache
        new_states: list[BlockState | None] = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, segment_pos, positions, None if cache is None else cache.blocks[i], build)
            new_states.append(s)
        if last_only:
            x = x[:, -1:]
        head = self.embed if self.head is None else self.head
        logits = head.decode(self.final_norm(x))  # (B, T, V), or (B, 1, V) with last_only
        cap = self.config.logit_soft_cap
        if cap:
            logits = torch.tanh(logits / cap) * cap

        if not build:
            return logits, None
        return logits, Cache(
            blocks=new_states,  # type: ignore[arg-type]
            position=positions[:, -1] + 1,
            segment_pos=segment_pos[:, -1] + 1,
        )

    def _check_inputs(self, tokens: torch.Tensor, segment_pos: torch.Tensor | None, cache: Cache | None):
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"tokens must be a (batch, time) integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        B, T = tokens.shape
        if T == 0:
            raise ValueError("tokens must contain at least one time step")
        if segment_pos is not None and segment_pos.shape != tokens.shape:
            raise ValueError(f"segment_pos shape {tuple(segment_pos.shape)} != tokens shape {tuple(tokens.shape)}")
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} sequences but tokens have batch {B}")
        # Reading values would break a compiled graph or a CUDA graph capture; callers check before.
        if torch.compiler.is_compiling() or (tokens.is_cuda and torch.cuda.is_current_stream_capturing()):
            return B, T
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got range [{lo}, {hi}]")
        return B, T

    def set_scan_backend(self, backend: str) -> None:
        """Choose the linear-scan backend of every recurrent block (see :mod:`griffon.scan`)."""
        for b in self.blocks:
            if isinstance(b.temporal, RecurrentBlock):
                b.temporal.scan_backend = backend

    def set_attention_kernel(self, kernel: str) -> None:
        """Choose how every attention block attends a fresh chunk (see ``attention.ATTENTION_KERNELS``)."""
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; known: {ATTENTION_KERNELS}")
        for b in self.blocks:
            if isinstance(b.temporal, Attention):
                b.temporal.kernel = kernel

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters; ``non_embedding``: less the embedding and an untied head (as Kaplan et al.
        2020 count a model's size)."""
        n = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return n
        return n - self.embed.weight.numel() - (0 if self.head is None else self.head.weight.numel())


@torch.no_grad()
def init_gpt2_(model: nn.Module, std: float) -> None:
    """GPT-2's initialisation, as the StructuredFFN papers' code applies it: every linear layer,
    RG-LRU gate and the embedding N(0, std^2), biases zero; structured layers from the SVD of such
    a draw (LowRank) or with orthogonal factors left at unit singular values (BlockShuffle,
    BlockDense). Norm gains, convolution taps and the RG-LRU's ``a_param`` keep their own."""
    for module in model.modules():
        if isinstance(module, StructuredLinear):
            module.reset_parameters(std, match_dense_norm=False)
        elif isinstance(module, nn.Linear | BlockDiagonalLinear | Embedding):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
