"""``model=auto``: a model, tokenizer and learning rate chosen for a corpus, a budget and this machine.

The choice minimises a scaling law's predicted loss over a grid of candidates:

1. **Candidates**: Griffin models of the shape family :func:`auto_model` (widths 64-512, depth
   and heads growing with width), each with the byte tokenizer or a byte-level BPE of 1024 or
   4096 tokens trained on the corpus's training documents.
2. **Machine**: the wall time of a training token is ``c0 + c1 * F`` for a model of ``F`` training
   FLOPs per token; ``c0`` and ``c1`` are fitted to a few timed training steps of three shapes on
   this machine, before the run (:func:`measure_machine`).
3. **Data**: a candidate reads ``D = tokens/s * seconds * bytes_per_token`` bytes of text, the
   bytes per token measured on the corpus. Beyond one epoch repeated bytes count less, as
   Muennighoff et al. 2023 (arXiv 2305.16264, eq. 5) model it: ``D' = U + U R* (1 - exp(-R/R*))``
   for ``U`` unique bytes, ``R = D/U - 1`` repetitions and ``R* = 15.4``.
4. **Law**: ``L(N, D) = E + A / N^alpha + B / D^beta`` in bits per byte, ``N`` the non-embedding
   parameters, fitted (:mod:`griffon.scaling.fit`) on runs of this shape family on the embedded corpus
   (``griffon scaling calibrate``; a fit from the project's 2-core CPU ships as
   ``griffon/scaling/auto_law.json``). Its ``E`` belongs to that corpus: on another corpus the
   predicted values are off by a constant, and the ranking of candidates is what is used.

Counting the law's ``D`` in bytes (not tokens) and ``N`` without embeddings treats a BPE as a way to
read more text per FLOP, at the price of its larger output layer (counted in ``F``) and of fewer
optimizer steps per byte; it pays when the corpus compresses well under it.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from griffon.accounting import param_counts, train_flops_per_token
from griffon.config import ConfigError, ModelConfig
from griffon.data.tokenizers import bpe_vocab_size, load_tokenizer, train_bpe
from griffon.data.training_data import TrainingData
from griffon.files import CONFIG_BYTES, FileError, read_json
from griffon.model import Griffon
from griffon.run import Run
from griffon.scaling.law import ScalingLaw, default_law
from griffon.train.config import TrainConfig
from griffon.train.parallelize import autocast, resolve_device, resolve_dtype

WIDTHS = (64, 96, 128, 160, 192, 256, 320, 384, 512)
BPE_VOCABS = (1024, 4096, 8192)
SEQ_LEN = 256
"""Tokens per training sequence (256 bytes or about a kilobyte of BPE text)."""
BATCH = 8
"""Sequences per step: 2048 tokens, small enough for hundreds of steps in minutes on a CPU."""
MIN_STEPS = 300
# The shortest time budget model=auto plans for (its planning takes up to half a minute), and the
# smallest corpus (one batch of SEQ_LEN x BATCH byte tokens).
MIN_MINUTES = 1.0
MIN_CORPUS_BYTES = SEQ_LEN * BATCH + 1
"""Candidates that would take fewer optimizer steps are not considered: the law was fitted on
runs of at least this many, and warmup plus decay need room."""
REPEAT_HALF_LIFE = 15.4
"""``R*`` of Muennighoff et al. 2023 (their fit for data repetition)."""
BPE_SAMPLE_BYTES = 2_000_000
"""Training text a candidate BPE is trained on to measure its bytes per token (the run's own BPE
is trained on all of it)."""
PROBE_WIDTHS = (96, 192, 320)
SHOWN = 8
"""Candidates listed by :meth:`AutoPlan.explain` (with each tokenizer's best)."""


def auto_model(width: int, vocab_size: int = 256) -> ModelConfig:
    """The auto family's model of ``width``: Griffin (two recurrent blocks per local-attention
    block), depth ``round(width / 48)`` (at least 2), heads of width 64 (at least one head),
    a 3x GeGLU FFN and a 128-token window. Griffon's choices, made at width 192 on the embedded
    corpus (``griffin-demo``, 4 layers) and scaled with width."""
    return ModelConfig(
        vocab_size=vocab_size, width=width, num_layers=max(2, round(width / 48)), num_heads=max(1, width // 64),
        attention_window=min(128, SEQ_LEN),
    )  # fmt: skip


def auto_lr(width: int) -> float:
    """Peak learning rate: 4e-3 at width 192 (tuned there), scaled as 1/width, at most 6e-3."""
    return min(6e-3, 4e-3 * 192 / width)


@dataclass
class Machine:
    """Seconds per training token as ``overhead + flops / flops_per_s``, fitted to timed steps."""

    overhead: float
    flops_per_s: float
    probes: list[dict[str, float]]

    def tokens_per_s(self, flops_per_token: float) -> float:
        return 1.0 / (self.overhead + flops_per_token / self.flops_per_s)


def _step_seconds(model_cfg: ModelConfig, device: torch.device, steps: int, dtype: torch.dtype | None) -> float:
    """Median wall time of an AdamW training step on random tokens (one untimed step first), under
    the autocast ``dtype`` the run will use (None: fp32), as the trainer takes it."""
    torch.manual_seed(0)
    model = Griffon(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model_cfg.vocab_size, (BATCH, SEQ_LEN + 1), device=device)
    seg = torch.arange(SEQ_LEN + 1, device=device).expand(BATCH, -1)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(device, dtype)():
            logits, _ = model(tokens[:, :-1], seg[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def measure_machine(
    device: torch.device, widths: tuple[int, ...] = PROBE_WIDTHS, steps: int = 2, dtype: torch.dtype | None = None
) -> Machine:
    """Time training steps of the auto family at ``widths``, under the autocast ``dtype`` the run
    will train in, and fit seconds per token = c0 + c1 F (least squares; ``c0`` is the per-token
    cost that is not matmul FLOPs: norms, gates, the scan)."""
    probes = []
    for w in widths:
        cfg = auto_model(w)
        seconds = _step_seconds(cfg, device, steps, dtype) / (BATCH * SEQ_LEN)
        probes.append({"width": w, "flops_per_token": train_flops_per_token(cfg, SEQ_LEN), "s_per_token": seconds})
    f = np.array([p["flops_per_token"] for p in probes])
    t = np.array([p["s_per_token"] for p in probes])
    c1, c0 = np.polyfit(f, t, 1)
    if c1 <= 0:  # timing noise on near-identical shapes: all of it is throughput
        c1, c0 = float(np.mean(t / f)), 0.0
    return Machine(overhead=max(float(c0), 0.0), flops_per_s=1.0 / float(c1), probes=probes)


@dataclass
class Candidate:
    tokenizer: str
    width: int
    vocab_size: int
    params: int
    non_embedding_params: int
    flops_per_token: float
    bytes_per_token: float
    tokens_per_s: float = 0.0
    tokens: float = 0.0
    steps: int = 0
    bytes: float = 0.0
    epochs: float = 0.0
    predicted_bpb: float = math.inf


def effective_bytes(d: float, unique: float, half_life: float = REPEAT_HALF_LIFE) -> float:
    """Muennighoff et al.'s effective data: repeated epochs are worth less and less."""
    if d <= unique:
        return d
    r = d / unique - 1
    return unique + unique * half_life * (1 - math.exp(-r / half_life))


@dataclass
class AutoPlan:
    """What ``model=auto`` chose, the candidates it weighed and why."""

    config: dict[str, Any]
    chosen: Candidate
    candidates: list[Candidate]
    law: ScalingLaw
    law_path: str
    machine: Machine | None
    unique_bytes: int
    budget: str
    planning_s: float

    def explain(self) -> str:
        lines = [f"model=auto: {self.unique_bytes / 1e6:.2f} MB of training text; budget {self.budget}"]
        if self.machine is not None:
            lines.append(
                f"  machine: {self.machine.overhead * 1e6:.2f} us + FLOPs / {self.machine.flops_per_s / 1e9:.1f} GFLOP/s"
                f" per training token (timed on widths {', '.join(str(int(p['width'])) for p in self.machine.probes)})"
            )
        lines.append(f"  learning rate: {self.config['optim']['lr']:g}")
        lines.append(f"  law: {self.law.describe()} [{self.law_path}]")
        lines.append("  tokenizer  width  params  non-emb  bytes/tok  tokens/s  steps  MB read  epochs  predicted bpb")
        ranked = sorted((c for c in self.candidates if math.isfinite(c.predicted_bpb)), key=lambda c: c.predicted_bpb)
        best_of = {c.tokenizer: c for c in reversed(ranked)}  # each tokenizer's best, shown even if not in the top
        shown = ranked[:SHOWN] + [c for c in best_of.values() if c not in ranked[:SHOWN]]
        for c in shown:
            mark = " <- chosen" if c is self.chosen else ""
            speed = f"{c.tokens_per_s:8.0f}" if c.tokens_per_s else "       -"
            lines.append(
                f"  {c.tokenizer:<9} {c.width:6d} {c.params / 1e6:6.2f}M {c.non_embedding_params / 1e6:6.2f}M"
                f" {c.bytes_per_token:9.2f} {speed} {c.steps:6d} {c.bytes / 1e6:8.1f} {c.epochs:7.2f}"
                f"  {c.predicted_bpb:.3f}{mark}"
            )
        too_short = len(self.candidates) - len(ranked)
        lines.append(
            f"  ({len(ranked) - len(shown)} more candidates not shown; {too_short} left out for fewer than {MIN_STEPS}"
            f" steps.) Planning took {self.planning_s:.0f} s, counted in the budget. The law's values are for its own"
            " corpus: only their order is used."
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": asdict(self.chosen),
            "candidates": [asdict(c) for c in self.candidates],
            "law": asdict(self.law),
            "law_path": self.law_path,
            "machine": asdict(self.machine) if self.machine else None,
            "unique_bytes": self.unique_bytes,
            "budget": self.budget,
            "planning_s": self.planning_s,
            "config": self.config,
        }


def _tokenizer_options(cfg: dict[str, Any], data: TrainingData) -> tuple[dict[str, float], int]:
    """Bytes per token of each tokenizer option and the corpus's unique training bytes. A prepared
    directory fixes its tokenizer; a raw corpus may take bytes or a BPE trained on its training
    documents (measured here on a sample of them)."""
    prepared = data.training_split()
    if prepared is not None:
        bytes_per_token, unique = prepared
        return {str(data.prepared): bytes_per_token}, unique
    options = cfg.get("data", {})
    docs = data.training_documents(options.get("val_fraction", 0.1))
    unique = sum(len(d.encode("utf-8")) for d in docs)
    if unique < MIN_CORPUS_BYTES:  # before any tokenizer is trained on it
        raise ConfigError(
            f"the corpus holds {unique:,} bytes of training text; model=auto needs at least {MIN_CORPUS_BYTES:,} "
            "(one batch of its sequences) to plan a run"
        )
    if options.get("tokenizer", "bytes") != "bytes":  # the user named one: keep it
        return {options["tokenizer"]: _bytes_per_token(options["tokenizer"], docs)}, unique
    options = {"bytes": 1.0}
    for v in BPE_VOCABS:
        options[f"bpe-{v}"] = _bytes_per_token(f"bpe-{v}", docs)
    return options, unique


def _split_sample(docs: list[str]) -> tuple[list[str], list[str]]:
    """Disjoint samples of the training documents (seeded): up to :data:`BPE_SAMPLE_BYTES` to train
    a candidate BPE on, and up to a quarter of that (or a fifth of the corpus) to measure it on, so
    a large vocabulary fitted to a small corpus is not credited with compression it memorised."""
    order = np.random.default_rng(0).permutation(len(docs))
    sizes = [len(docs[i].encode("utf-8")) for i in order]
    measure_cap = min(BPE_SAMPLE_BYTES // 4, sum(sizes) // 5)
    measure, fit, m_bytes, f_bytes = [], [], 0, 0
    for i, size in zip(order, sizes, strict=True):
        if m_bytes < measure_cap or not measure:
            measure.append(docs[i])
            m_bytes += size
        elif f_bytes < BPE_SAMPLE_BYTES:
            fit.append(docs[i])
            f_bytes += size
    return fit or measure, measure


def _bytes_per_token(tokenizer: str, docs: list[str]) -> float:
    fit, measure = _split_sample(docs)
    vocab = bpe_vocab_size(tokenizer)
    with tempfile.TemporaryDirectory(prefix="griffon-auto-") as tmp:
        tok = train_bpe(iter(fit), vocab, Path(tmp) / "t.json") if vocab else load_tokenizer(tokenizer)
        n_tokens = sum(len(tok.encode(d)) for d in measure)
    return sum(len(d.encode("utf-8")) for d in measure) / max(n_tokens, 1)


def _vocab_size(tokenizer: str) -> int:
    if tokenizer == "bytes":
        return 256
    return bpe_vocab_size(tokenizer) or load_tokenizer(tokenizer).vocab_size


def plan(
    cfg: dict[str, Any],
    data: TrainingData,
    law: ScalingLaw | None = None,
    law_path: str | Path | None = None,
    machine: Machine | None = None,
    widths: tuple[int, ...] | None = None,
    lr: float | None = None,
) -> AutoPlan:
    """Resolve ``model: "auto"`` in the train-config dict ``cfg`` for ``data`` (its ``data.path``,
    resolved): the returned plan's ``config`` is the dict with the
    chosen model, tokenizer, sequence length, batch, learning rate (``lr``, the one the user set,
    is kept) and (for a time budget) the minutes left for training once planning is paid for."""
    t0 = time.perf_counter()
    if law is None:
        law, law_path = default_law()
    minutes, flops = cfg.get("max_minutes"), cfg.get("max_flops")
    if not minutes and not flops:
        raise ConfigError("model=auto needs a time or FLOP budget: set max_minutes or max_flops")
    if minutes and minutes < MIN_MINUTES:  # refused before the planning it could not pay for
        raise ConfigError(
            f"max_minutes={minutes:g} is shorter than model=auto needs (at least {MIN_MINUTES:g}: its planning "
            "alone takes up to half a minute); give more time or name a model"
        )
    options, unique = _tokenizer_options(cfg, data)
    candidates = []
    for tokenizer, ratio in options.items():
        vocab = _vocab_size(tokenizer)
        for w in widths or WIDTHS:
            mcfg = auto_model(w, vocab_size=max(vocab, 256))
            f = train_flops_per_token(mcfg, SEQ_LEN)
            n, n_body = param_counts(mcfg)
            candidates.append(Candidate(tokenizer, w, mcfg.vocab_size, n, n_body, f, ratio))
    if minutes and machine is None:
        device = resolve_device(cfg.get("device", "auto"))
        machine = measure_machine(device, dtype=resolve_dtype(cfg.get("dtype", "auto"), device))
    planning = time.perf_counter() - t0  # what is left of a time budget is the training's
    seconds = minutes * 60 - planning if minutes else None
    if seconds is not None and seconds <= 0:
        raise ConfigError(f"max_minutes={minutes} leaves no time to train after {planning:.0f} s of planning")
    for c in candidates:
        budgets = []
        if seconds is not None:
            c.tokens_per_s = machine.tokens_per_s(c.flops_per_token)
            budgets.append(c.tokens_per_s * seconds)
        if flops:
            budgets.append(flops / c.flops_per_token)
        c.tokens = min(budgets)
        c.steps = int(c.tokens // (SEQ_LEN * BATCH))
        c.bytes = c.tokens * c.bytes_per_token
        c.epochs = c.bytes / unique
        if c.steps >= MIN_STEPS:
            c.predicted_bpb = law.predict(c.non_embedding_params, effective_bytes(c.bytes, unique))
    chosen = min(candidates, key=lambda c: c.predicted_bpb)
    if not math.isfinite(chosen.predicted_bpb):
        raise ConfigError(
            f"the budget is too small for model=auto: even the smallest model gets fewer than {MIN_STEPS} steps"
        )
    out = json.loads(json.dumps(cfg))
    out["model"] = auto_model(chosen.width, chosen.vocab_size).to_dict()
    out_data = out.setdefault("data", {})
    if data.prepared is None:
        out_data["tokenizer"] = chosen.tokenizer
    out_data["seq_len"], out_data["batch_size"] = SEQ_LEN, BATCH
    out.setdefault("optim", {})["lr"] = lr if lr is not None else auto_lr(chosen.width)
    # The plan is for the chosen candidate's tokens (several epochs of a small corpus): a time
    # budget alone would schedule one epoch. The run stops at them or when time runs out.
    out["max_tokens"] = chosen.steps * SEQ_LEN * BATCH
    if minutes:
        out["max_minutes"] = max(minutes - (time.perf_counter() - t0) / 60, 0.1)
        # the tokens are a forecast of the pace: the trainer re-plans them from the pace it measures
        out["replan_tokens"] = True
    budget = " and ".join(([f"{minutes:g} min"] if minutes else []) + ([f"{flops:.3g} FLOPs"] if flops else []))
    return AutoPlan(out, chosen, candidates, law, str(law_path), machine, unique, budget, planning)


def user_lr(config: str | None, overrides: list[str], d: dict) -> float | None:
    """The learning rate the user set (``--set optim.lr=...`` or in the config file), which
    ``model=auto`` keeps; None when it is the default's, for the plan to choose."""
    if any(o.split("=", 1)[0].strip() == "optim.lr" for o in overrides):
        return d["optim"]["lr"]
    if config is not None and Path(config).is_file():
        try:
            given = read_json(config, CONFIG_BYTES, "a config file")
        except FileError:
            return None
        if isinstance(given, dict) and isinstance(given.get("optim"), dict) and "lr" in given["optim"]:
            return d["optim"]["lr"]
    return None


def plan_new_run(d: dict, run: Run, lr: float | None = None) -> AutoPlan:
    """:func:`plan` for a new ``run``, after the checks that need no model: the run directory is
    free, the rest of the config is valid, ``data.path`` names data. ``lr``: the user's, kept
    (:func:`user_lr`)."""
    run.check_new()
    checked = TrainConfig.from_dict({**d, "model": "griffin-demo"})  # everything but the model, before planning
    return plan(d, TrainingData.resolve(checked.data.path), lr=lr)
