"""A mixture-of-experts FFN: token-choice top-k routing over experts that are the model's own MLPs.

Routing (Mixtral, arXiv 2401.04088): router logits ``x W_r`` (float32), softmax probabilities
``p``, the ``top_k`` experts of highest ``p + b`` chosen (``b`` is DeepSeek-V3's balancing bias,
arXiv 2412.19437, zero unless ``bias_update_rate`` is set; it steers the choice only, never the
gates), gates ``p`` of the chosen renormalised to sum to 1 for ``top_k > 1`` and left as they are
for ``top_k = 1``, where Switch Transformers (arXiv 2101.03961) multiply by the router probability
so that the task loss reaches the router (``MoEConfig.renormalize`` overrides). DeepSeek-V3 adds its
bias to sigmoid scores; here it is added to the softmax probabilities, on the same footing as the
choice it steers. Dropless: every token reaches all its
experts, however uneven the load (as MegaBlocks, arXiv 2211.15841).

Dispatch (:meth:`MoE.forward`): the ``T * top_k`` assignments are sorted by expert, each expert
runs once on its contiguous slice of gathered tokens, and the weighted outputs are added back to
their tokens. :meth:`MoE.forward_reference` runs every expert on every token and masks (the
definition; the tests compare the two in values and gradients).

Balancing, weighted in the training loss (:func:`router_loss`):

* load balance (Switch, arXiv 2101.03961; GShard): ``E * sum_i f_i P_i`` with ``f_i`` the
  fraction of assignments expert ``i`` gets and ``P_i`` its mean router probability; 1 when
  the load is uniform. ``f`` sums to 1 over the ``T * k`` assignments, as in Switch; HF's Mixtral
  loss counts each token's k choices each as a whole token (``f`` summing to k), so at ``top_k = 2``
  the same coefficient pushes half as hard here as there;
* router z-loss (ST-MoE, arXiv 2202.08906): ``mean_t logsumexp(logits_t)^2``, which keeps the
  logits small enough for float32 softmax to stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from griffon.config import LinearStructure, MoEConfig
from griffon.nn.mlp import GatedMLP, gelu_tanh, make_mlp


@dataclass
class Routing:
    """Which experts each token goes to, with what weight."""

    experts: torch.Tensor  # (T, k) long: the chosen experts
    gates: torch.Tensor  # (T, k) float32 (or the model's dtype if wider): their weights (sum 1 if renormalised)
    logits: torch.Tensor  # (T, E) same dtype
    probs: torch.Tensor  # (T, E) same dtype: softmax(logits)


class MoE(nn.Module):
    """``sum_k gate_k * expert_k(x)`` over each token's top-k experts, plus shared experts."""

    def __init__(
        self,
        cfg: MoEConfig,
        mlp_type: str,
        width: int,
        expert_width: int,
        out_init_scale: float = 1.0,
        structure: LinearStructure | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        assert cfg.num_experts is not None
        structure = structure or LinearStructure()
        self.num_experts, self.top_k, self.renormalize = cfg.num_experts, cfg.top_k, cfg.renormalizes
        self.router = nn.Linear(width, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(
            make_mlp(mlp_type, width, expert_width, out_init_scale, structure, bias) for _ in range(cfg.num_experts)
        )
        # Shared experts: one MLP as wide as all of them (their sum is exactly that MLP).
        wide = expert_width * cfg.shared_experts
        self.shared = make_mlp(mlp_type, width, wide, out_init_scale, structure, bias) if wide else None
        # DeepSeek-V3's routing bias: state, not a parameter (no gradient; it moves with the load).
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self._reset_router()
        self.stats = RouterStats(cfg.num_experts)
        self.grouped: bool | None = None
        """Run dense experts as grouped GEMMs (True), one GEMM an expert (False), or choose (None:
        grouped for dense experts on the GPU in bfloat16)."""
        self.losses: dict[str, torch.Tensor] = {}
        """The last training forward's balance and z losses (with their graphs), for the trainer."""

    def _reset_router(self) -> None:
        nn.init.normal_(self.router.weight, std=1.0 / math.sqrt(self.router.in_features))

    def reset_parameters(self) -> None:
        self._reset_router()
        for mlp in [*self.experts, *([self.shared] if self.shared is not None else [])]:
            mlp.reset_parameters()

    def route(self, x: torch.Tensor) -> Routing:
        """Routing of tokens ``x`` (T, D)."""
        # Routing in float32 at least, whatever the model's dtype: the choice and the gates are
        # sensitive to rounding (ST-MoE's selective precision), and the router is a sliver of the FLOPs.
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.router.weight.to(dtype))  # (T, E)
        probs = logits.softmax(dim=-1)
        chosen = torch.topk(probs + self.expert_bias, self.top_k, dim=-1).indices  # (T, k)
        gates = probs.gather(1, chosen)  # (T, k)
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return Routing(chosen, gates, logits, probs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        r = self.route(x)
        flat = r.experts.reshape(-1)  # (T k,)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        token = order // self.top_k  # (T k,) the token of each sorted assignment
        counts = torch.bincount(flat, minlength=self.num_experts)  # (E,) assignments per expert
        xs = x[token]  # (T k, D)
        if self._use_grouped(x):
            ys = self._grouped_experts(xs, counts)  # the counts stay on the device: no sync
        else:
            # An expert without tokens still runs, on no rows: its parameters stay in the graph
            # with zero gradients, as DDP (which waits for every parameter's gradient) needs.
            chunks = xs.split(counts.tolist())
            ys = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks, strict=True)])
        ys = ys * r.gates.reshape(-1)[order, None].to(x.dtype)  # (T k, D)
        y = torch.zeros_like(x).index_add_(0, token, ys)
        return self._finish(x, y, r).reshape(shape)

    def _use_grouped(self, x: torch.Tensor) -> bool:
        if self.grouped and not self.dense_experts:
            raise ValueError("grouped GEMMs run dense experts only; these are structured")
        if self.grouped is not None:
            return self.grouped
        # Grouped GEMM on the GPU in bfloat16 (CUTLASS kernels); per-expert GEMMs elsewhere.
        return x.is_cuda and x.dtype == torch.bfloat16 and self.dense_experts and hasattr(torch, "_grouped_mm")

    @property
    def dense_experts(self) -> bool:
        """Whether every expert is an MLP of dense ``nn.Linear`` projections (the grouped path's case)."""
        return all(isinstance(p, nn.Linear) for e in self.experts for p in e._projections())

    def _grouped_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert on its slice of ``xs`` (T k, D), sorted by expert, in one grouped GEMM a
        projection (``torch._grouped_mm``); the experts' weights stacked (E, in, out) for it."""
        offsets = counts.cumsum(0).to(torch.int32)
        which = torch.repeat_interleave(torch.arange(self.num_experts, device=xs.device), counts)  # (T k,)

        def project(name: str, inputs: torch.Tensor) -> torch.Tensor:
            layers = [getattr(e, name) for e in self.experts]
            weight = torch.stack([layer.weight for layer in layers]).transpose(1, 2)  # (E, in, out)
            out = torch._grouped_mm(inputs, weight, offs=offsets)
            if layers[0].bias is None:
                return out
            return out + torch.stack([layer.bias for layer in layers])[which]

        first = self.experts[0]
        if isinstance(first, GatedMLP):
            hidden = first.act(project("gate", xs)) * project("up", xs)
        else:
            hidden = gelu_tanh(project("up", xs))
        return project("down", hidden)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by its gate (zero where not chosen)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        r = self.route(x)
        weight = torch.zeros_like(r.probs).scatter(1, r.experts, r.gates)  # (T, E)
        y = sum(weight[:, e, None].to(x.dtype) * expert(x) for e, expert in enumerate(self.experts))
        return self._finish(x, y, r).reshape(shape)

    def _finish(self, x: torch.Tensor, y: torch.Tensor, r: Routing) -> torch.Tensor:
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training and torch.is_grad_enabled():
            self.losses = {"balance": balance_loss(r.probs, r.experts), "z": z_loss(r.logits)}
            self.stats.record(r)
        return y


def balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load balance ``E * sum_i f_i P_i``: ``f_i`` the fraction of the ``T * k``
    assignments that go to expert ``i`` (not differentiable), ``P_i`` its mean probability."""
    E = probs.shape[-1]
    f = torch.bincount(experts.reshape(-1), minlength=E).float() / experts.numel()
    return E * (f * probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean squared log-partition of the router logits."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class RouterStats:
    """Tokens each expert received and the router's entropy, summed over the training forwards
    since :meth:`take` (what the balancing bias and the log read), kept on the model's device so
    that recording never waits for it. A recomputed forward (activation checkpointing) counts
    twice, which leaves fractions and means unchanged."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.sums: torch.Tensor | None = None  # (E + 2,) float64: load, entropy, tokens

    def record(self, r: Routing) -> None:
        with torch.no_grad():
            load = torch.bincount(r.experts.reshape(-1), minlength=self.num_experts).double()
            entropy = -(r.probs * r.probs.clamp_min(1e-30).log()).sum().double()
            tokens = torch.tensor(float(r.probs.shape[0]), dtype=torch.float64, device=load.device)
            sums = torch.cat([load, entropy[None], tokens[None]])
            self.sums = sums if self.sums is None else self.sums + sums

    def take(self, device: torch.device) -> torch.Tensor:
        """The sums (E + 2,): each expert's load, the summed entropy and the tokens; and reset them."""
        out = self.sums if self.sums is not None else torch.zeros(self.num_experts + 2, dtype=torch.float64)
        self.sums = None
        return out.to(device)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def router_loss(model: nn.Module, cfg: MoEConfig) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The weighted balance and z losses of the last training forward, summed over layers (None
    for a model without experts), and their unweighted means over layers to log."""
    layers = [m for m in moe_layers(model) if m.losses]
    if not layers:
        return None, {}
    balance = torch.stack([m.losses["balance"] for m in layers]).mean()
    z = torch.stack([m.losses["z"] for m in layers]).mean()
    for m in layers:
        m.losses = {}  # drop the graphs
    total = len(layers) * (cfg.aux_loss_coef * balance + cfg.z_loss_coef * z)
    return total, {"moe_balance": float(balance.detach()), "moe_z": float(z.detach())}


def discard_router_stats(model: nn.Module) -> None:
    """Forget the load of a step that was not taken (a non-finite loss skipped it)."""
    for m in moe_layers(model):
        m.stats.take(m.expert_bias.device)
        m.losses = {}


def update_routers(model: nn.Module, cfg: MoEConfig, all_reduce=None) -> dict[str, object]:
    """After an optimizer step: the load of each layer's experts over the step (summed over ranks
    by ``all_reduce``, a function of a tensor), the routing biases moved by ``bias_update_rate``
    towards a uniform load (DeepSeek-V3: ``b_i += rate * sign(mean load - load_i)``), and the
    figures to log: each layer's load as fractions and the mean router entropy in nats."""
    loads, entropy, tokens = [], 0.0, 0
    for m in moe_layers(model):
        sums = m.stats.take(m.expert_bias.device)
        if all_reduce is not None:
            sums = all_reduce(sums)
        load, ent, n = sums[:-2], float(sums[-2]), int(sums[-1])
        if cfg.bias_update_rate and n:
            with torch.no_grad():
                m.expert_bias.add_(cfg.bias_update_rate * torch.sign(load.mean() - load).to(m.expert_bias))
        loads.append((load / max(float(load.sum()), 1.0)).tolist())
        entropy, tokens = entropy + ent, tokens + n
    if not tokens:
        return {}
    peak = max(max(f) * len(f) for f in loads)  # the busiest expert's load over the uniform share
    return {"moe_load": loads, "moe_load_max": peak, "moe_entropy": entropy / tokens}
