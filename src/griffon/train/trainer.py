"""The training loop: ``train(config, run_dir)``.

The model stays single-device code; this module wraps it (activation checkpointing, compile,
DDP/FSDP2) from outside, feeds it packed documents, and owns the run directory:
``config.json``, ``tokenizer.json``, ``data/`` (the embedded corpus, prepared), ``log.jsonl``,
``log.csv``, ``loss.png``, ``checkpoints/step_*``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from griffon.accounting import self_guided_flops_per_token, train_flops_per_token
from griffon.allocator import keep_freed_memory
from griffon.atomic import atomic_write
from griffon.checkpoint import CheckpointError, run_checkpoints
from griffon.config import ConfigError, LinearStructure
from griffon.data.corpus import default_corpus
from griffon.data.loader import PackedLoader, TokenSplit, eval_batches
from griffon.data.prepare import prepare, read_meta, verify
from griffon.data.sources import DataError
from griffon.data.tokenizers import Tokenizer, load_tokenizer
from griffon.model import Griffon
from griffon.train import distributed as D
from griffon.train.checkpoint import load_checkpoint, save_checkpoint
from griffon.train.config import TrainConfig
from griffon.train.logging import RunLogger, plot_losses
from griffon.train.losses import goldfish_mask, next_token_loss
from griffon.train.optim import adaptive_grad_clip, lr_at, make_optimizer
from griffon.train.run_dir import RunLock, clean_run_dir, holds_run
from griffon.train.self_guided import SelfGuidance, plan_guided_run
from griffon.train.signals import StopRequest, TrainingInterrupted


class TrainingError(RuntimeError):
    """Training cannot go on (for example, too many non-finite steps in a row)."""


@dataclass
class TrainResult:
    steps: int
    tokens: int
    flops: float
    """Training FLOPs spent (:mod:`griffon.accounting`, plus the self-guided dense branches)."""
    val_loss: float | None
    val_bpb: float | None
    tokens_per_s: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). ``auto`` avoids bf16 on CPUs without bf16 matmul
    instructions, where PyTorch falls back to scalar code (100x slower than fp32 on AVX2)."""
    if name == "fp32":
        return None
    if name == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def apply_activation_checkpointing(model: Griffon) -> None:
    """Recompute each residual block in the backward pass instead of storing its activations."""
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *args, _f=forward: checkpoint(_f, *args, use_reentrant=False)


def check_data_source(cfg: TrainConfig) -> Tokenizer:
    """Validate the run's data before anything is written: a configured prepared directory (its
    meta.json, tokenizer and, with ``data.verify``, the shards' SHA-256), or the tokenizer the
    embedded corpus will be prepared with. Returns the tokenizer; raises on anything wrong."""
    if cfg.data.path is not None:
        path = Path(cfg.data.path)
        read_meta(path)
        tokenizer = load_tokenizer(path)
        _check_vocab(tokenizer, cfg)
        if cfg.data.verify:
            verify(path)
        return tokenizer
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    _check_vocab(tokenizer, cfg)
    return tokenizer


def _check_vocab(tokenizer: Tokenizer, cfg: TrainConfig) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the data's tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}; "
            f"set model.vocab_size={tokenizer.vocab_size}"
        )


def ensure_data(cfg: TrainConfig, run_dir: Path, tokenizer: Tokenizer, is_main: bool) -> Path:
    """The prepared data directory: the configured one, or the embedded corpus prepared into the
    run (atomically, so a kill midway leaves nothing to mistake for data)."""
    if cfg.data.path is not None:
        return Path(cfg.data.path)
    data_dir = run_dir / "data"
    if is_main:
        if not data_dir.exists():
            prepare([default_corpus()], tokenizer, data_dir, val_fraction=cfg.data.val_fraction, seed=0, progress=False)
        elif read_meta(data_dir)["tokenizer"] != tokenizer.describe():
            raise DataError(f"{data_dir} was prepared with another tokenizer than data.tokenizer; remove it")
        elif cfg.data.verify:
            verify(data_dir)
    D.barrier()
    return data_dir


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cfg: TrainConfig,
    split: TokenSplit,
    token_bytes: torch.Tensor,
    device: torch.device,
    autocast,
    max_batches: int | None,
) -> dict:
    """Validation loss (nats/token) and bits per byte over the held-out documents
    (``max_batches`` batches spread over them, or all of them)."""
    model.eval()
    total_nats = total_tokens = total_bytes = 0.0
    bs = cfg.data.batch_size
    for tokens, seg in eval_batches(split, cfg.data.seq_len, bs, max_batches):
        tokens, seg = tokens.to(device), seg.to(device)
        with autocast():
            logits, _ = model(tokens[:, :-1], seg[:, :-1])
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
        )
        total_nats += losses.item()
        total_tokens += tokens[:, 1:].numel()
        total_bytes += token_bytes[tokens[:, 1:].flatten().cpu()].sum().item()
    stats = torch.tensor([total_nats, total_tokens, total_bytes], dtype=torch.float64, device=device)
    stats = D.all_reduce_mean(stats)
    model.train()
    nats, n, nbytes = stats.tolist()
    return {"val_loss": nats / n, "val_bpb": nats / math.log(2) / nbytes}


def _state_dicts(model: nn.Module, raw: Griffon, opt: torch.optim.Optimizer, mode: str):
    """Full (unsharded) model and optimizer state, gathered for saving."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return raw.state_dict(), opt.state_dict()


def _load_optimizer(model: nn.Module, opt: torch.optim.Optimizer, mode: str, state: dict) -> None:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, checkpoint: str | None = None) -> TrainResult:
    """Train (or resume) the run in ``run_dir`` according to ``cfg``.

    Nothing is written before the config and data have been checked, and the run directory holds
    a run (its ``config.json``) only once it is complete. One process trains a run at a time (an
    exclusive lock on the directory). Resuming a run with no checkpoint starts it from step 0;
    ``checkpoint`` names the checkpoint to resume from (default: the newest). On SIGINT or
    SIGTERM the current step completes, a checkpoint is saved and :class:`TrainingInterrupted` is raised.
    """
    run_dir = Path(run_dir)
    tokenizer = check_data_source(cfg)
    device = resolve_device(cfg.device)
    info = D.init_distributed(cfg.distributed, device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    keep_freed_memory()
    try:
        with RunLock(run_dir) if info.is_main else contextlib.nullcontext():
            return _train(cfg, run_dir, resume, checkpoint, tokenizer, device, info)
    finally:
        D.shutdown()


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
    checkpoint: str | None,
    tokenizer: Tokenizer,
    device: torch.device,
    info: D.DistInfo,
) -> TrainResult:
    if info.is_main:
        if resume and not holds_run(run_dir):
            raise ConfigError(f"{run_dir} holds no run (no config.json) to resume")
        if not resume and holds_run(run_dir):
            raise ConfigError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out"
            )
        clean_run_dir(run_dir)
    data_dir = ensure_data(cfg, run_dir, tokenizer, info.is_main)
    tokenizer = load_tokenizer(data_dir)
    _check_vocab(tokenizer, cfg)
    token_bytes = torch.from_numpy(np.load(data_dir / "token_bytes.npy", allow_pickle=False))
    train_split, val_split = TokenSplit.open(data_dir, "train"), TokenSplit.open(data_dir, "val")
    if info.is_main:  # the run is complete from here on: its config is written last
        tokenizer.save(run_dir)
        atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(cfg.to_json()))
    D.barrier()

    torch.manual_seed(cfg.seed)
    raw = Griffon(cfg.model).to(device)
    loader = PackedLoader(train_split, cfg.data.seq_len, cfg.data.batch_size, cfg.seed, info.rank, info.world_size)
    tokens_per_step = cfg.data.seq_len * cfg.data.batch_size * cfg.data.grad_accum * info.world_size
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    total_steps = _planned_steps(cfg, tokens_per_step, flops_per_token, loader.steps_per_epoch)
    sg = cfg.self_guided
    guidance = SelfGuidance(raw) if sg.enabled else None
    guide_steps, guide_flops_per_token = 0, 0.0
    if guidance is not None:
        guide_flops_per_token = self_guided_flops_per_token(cfg.model)
        dense_fpt = train_flops_per_token(cfg.model.replace(ffn_structure=LinearStructure()), cfg.data.seq_len)
        planned = total_steps
        if sg.mode == "fixed_flops":  # the budget is the dense model's: plan its steps
            planned = _planned_steps(cfg, tokens_per_step, dense_fpt, loader.steps_per_epoch)
        total_steps, guide_steps = plan_guided_run(
            sg.fraction, sg.mode, sg.reduce_flop, cfg.seed, planned,
            step_flops=tokens_per_step * flops_per_token,
            guide_step_flops=tokens_per_step * guide_flops_per_token,
            dense_step_flops=tokens_per_step * dense_fpt,
            flop_budget=cfg.max_flops,
        )  # fmt: skip
    progress = {"step": 0, "tokens": 0, "flops": 0.0, "elapsed": 0.0}
    payload = None
    if resume:
        payload, progress = _resume_from(run_dir, raw, checkpoint, info.is_main)
    if payload is not None:
        loader.load_state_dict(progress["loader"])
        if guidance is not None and progress["step"] >= guide_steps:
            guidance.remove()
            guidance = None
        elif guidance is not None:
            guidance.load_state_dict(payload["self_guided"])

    if cfg.activation_checkpointing:
        apply_activation_checkpointing(raw)
    model: nn.Module = D.parallelize(raw, cfg.distributed, device)
    # After parallelize: FSDP2 replaces the parameters with sharded ones.
    opt = make_optimizer(raw, cfg.optim)
    if guidance is not None:
        guidance.add_to(opt, cfg.optim.weight_decay)
    if payload is not None:
        _load_optimizer(model, opt, cfg.distributed, payload["optimizer"])
    if cfg.compile:
        model = torch.compile(model)

    dtype = resolve_dtype(cfg.dtype, device)

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    logger = RunLogger(run_dir, info.is_main, truncate_after_step=progress["step"] if resume else None)
    saved_step = progress["step"] if payload is not None else None
    stop = StopRequest()
    bad_steps = 0
    start = time.time() - progress["elapsed"]
    window_t, window_tokens = time.time(), 0
    last_eval: dict = {}
    step_loss, tps = float("nan"), 0.0
    try:
        while not _done(cfg, progress, total_steps, start):
            if D.any_rank(stop.requested, device):
                if saved_step != progress["step"]:
                    _save(run_dir, raw, model, opt, cfg, progress, loader, start, info, guidance, saved_step)
                raise TrainingInterrupted(
                    f"interrupted at step {progress['step']}, checkpoint saved; continue with: "
                    f"griffon train --resume {run_dir}"
                )
            step = progress["step"]
            lr = lr_at(step, _schedule_steps(cfg, step, total_steps, start), cfg.optim)
            for group in opt.param_groups:
                group["lr"] = lr
            step_flops_per_token = flops_per_token
            if guidance is not None and guidance.set_step(step, guide_steps, sg.reduce_flop, cfg.seed):
                step_flops_per_token += guide_flops_per_token
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.data.grad_accum):
                tokens, seg = next(loader)
                tokens, seg = tokens.to(device), seg.to(device)
                inputs, targets = tokens[:, :-1], tokens[:, 1:]
                mask = goldfish_mask(inputs, cfg.goldfish_k, cfg.goldfish_h) if cfg.goldfish_k else None
                sync = micro == cfg.data.grad_accum - 1 or cfg.distributed != "ddp"
                with contextlib.nullcontext() if sync else model.no_sync(), autocast():
                    logits, _ = model(inputs, seg[:, :-1])
                loss, _ = next_token_loss(logits, targets, mask)
                (loss / cfg.data.grad_accum).backward()
                loss_sum += loss.detach()
            step_loss = D.all_reduce_mean(loss_sum / cfg.data.grad_accum).item()

            if guidance is not None:
                D.all_reduce_grads_(guidance.parameters())  # the guides live outside the DDP wrapper
            grad_norm = _clip(raw, model, cfg, guidance)
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                bad_steps += 1
                opt.zero_grad(set_to_none=True)
                logger.log({"kind": "skip", "step": step + 1, "loss": step_loss, "grad_norm": grad_norm})
                if bad_steps >= cfg.max_bad_steps:
                    newest = (
                        "no checkpoint was saved yet"
                        if saved_step is None
                        else f"the newest checkpoint (step {saved_step}) is from before them"
                    )
                    raise TrainingError(
                        f"stopping: {bad_steps} steps in a row had a non-finite loss or gradient "
                        f"(last loss {step_loss}); {newest}"
                    )
                continue
            bad_steps = 0
            opt.step()
            opt.zero_grad(set_to_none=True)

            progress["step"] += 1
            progress["tokens"] += tokens_per_step
            progress["flops"] += tokens_per_step * step_flops_per_token
            if guidance is not None and progress["step"] >= guide_steps:
                guidance.remove(opt)  # the guided phase is over: no guide survives in model or optimizer
                guidance = None
            window_tokens += tokens_per_step
            step = progress["step"]
            if step % cfg.log_every == 0 or step == 1:
                now = time.time()
                tps = window_tokens / max(now - window_t, 1e-9)
                window_t, window_tokens = now, 0
                record = {"kind": "train", "step": step, "tokens": progress["tokens"], "loss": step_loss,
                          "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps, "time": now - start}  # fmt: skip
                if sg.enabled:
                    record["guide"] = 0.0 if guidance is None else guidance.coefficient
                logger.log(record)
            logger.progress(step, _fraction(cfg, progress, total_steps, start), tps, step_loss)
            if step % cfg.eval_every == 0:
                last_eval = evaluate(model, cfg, val_split, token_bytes, device, autocast, cfg.eval_batches)
                logger.log({"kind": "eval", "step": step, "tokens": progress["tokens"], **last_eval})
            if step % cfg.save_every == 0:
                _save(run_dir, raw, model, opt, cfg, progress, loader, start, info, guidance, saved_step)
                saved_step = step
        last_eval = evaluate(model, cfg, val_split, token_bytes, device, autocast, cfg.final_eval_batches)
        logger.log({"kind": "final_eval", "step": progress["step"], "tokens": progress["tokens"], **last_eval})
        if saved_step != progress["step"]:
            _save(run_dir, raw, model, opt, cfg, progress, loader, start, info, guidance, saved_step)
    finally:
        stop.restore()
        logger.close()
    elapsed = time.time() - start
    if info.is_main:
        plot_losses(run_dir)
    return TrainResult(
        steps=progress["step"],
        tokens=progress["tokens"],
        flops=progress["flops"],
        val_loss=last_eval.get("val_loss"),
        val_bpb=last_eval.get("val_bpb"),
        tokens_per_s=progress["tokens"] / max(elapsed, 1e-9),
    )


def _clip(raw: Griffon, model: nn.Module, cfg: TrainConfig, guidance: SelfGuidance | None) -> float:
    if cfg.optim.agc is not None:
        adaptive_grad_clip(raw, cfg.optim.agc)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
    params = list(model.parameters()) + (guidance.parameters() if guidance is not None else [])
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _save(run_dir, raw, model, opt, cfg, progress, loader, start, info, guidance, saved_step) -> None:
    progress = dict(progress, loader=loader.state_dict(), elapsed=time.time() - start)
    model_sd, opt_sd = _state_dicts(model, raw, opt, cfg.distributed)
    training_state = {"optimizer": opt_sd}
    if guidance is not None:
        training_state["self_guided"] = guidance.state_dict()
    if info.is_main:
        to_save = raw
        if cfg.distributed == "fsdp":
            to_save = Griffon(cfg.model)
            to_save.load_state_dict(model_sd)
        try:
            save_checkpoint(run_dir, to_save, training_state, progress, cfg.keep_checkpoints, cfg.max_weight_abs)
        except CheckpointError as e:
            newest = "none was saved before" if saved_step is None else f"the newest is step {saved_step}"
            raise TrainingError(f"stopping at step {progress['step']}: {e}; {newest}") from None
    D.barrier()


def _resume_from(run_dir: Path, model: Griffon, name: str | None, is_main: bool) -> tuple[dict | None, dict[str, Any]]:
    """Load the checkpoint to resume from into ``model``: ``name``, else the newest; none: step 0.

    A newest checkpoint that does not load is an error that names the newest one that does; with
    ``name`` set to an older checkpoint, the newer ones are renamed ``discarded_step_*`` (kept for
    inspection, never resumed) so the run continues from the chosen one.
    """
    ckpts = run_checkpoints(run_dir)
    fresh = {"step": 0, "tokens": 0, "flops": 0.0, "elapsed": 0.0}
    if name is None:
        if not ckpts:
            if is_main:
                sys.stderr.write(f"{run_dir} has no checkpoint yet: starting it from step 0\n")
            return None, fresh
        chosen = ckpts[-1]
    else:
        chosen = run_dir / "checkpoints" / Path(name).name
        if chosen not in ckpts:
            names = ", ".join(p.name for p in ckpts) or "none"
            raise CheckpointError(f"{run_dir} has no checkpoint {name!r} (it has: {names})")
    try:
        payload, progress = load_checkpoint(chosen, model)
    except CheckpointError as e:
        for p in reversed([p for p in ckpts if p < chosen]):
            try:
                load_checkpoint(p, copy.deepcopy(model))
            except CheckpointError:
                continue
            raise CheckpointError(
                f"{e}; checkpoint {p.name} loads: resume from it with --resume {run_dir} --checkpoint {p.name}"
            ) from None
        raise
    if is_main:
        for newer in (p for p in ckpts if p > chosen):
            newer.rename(newer.with_name(f"discarded_{newer.name}"))
    return payload, progress


def _planned_steps(cfg: TrainConfig, tokens_per_step: int, flops_per_token: float, steps_per_epoch: int) -> int:
    """Steps the schedule spans: the tightest of the step, token and FLOP budgets."""
    candidates = []
    if cfg.max_steps:
        candidates.append(cfg.max_steps)
    if cfg.max_tokens:
        candidates.append(math.ceil(cfg.max_tokens / tokens_per_step))
    if cfg.max_flops:
        candidates.append(math.ceil(cfg.max_flops / (tokens_per_step * flops_per_token)))
    if not candidates:  # time budget only: plan for one epoch, the time limit may stop earlier
        candidates.append(steps_per_epoch)
    return max(1, min(candidates))


def _done(cfg: TrainConfig, progress: dict, total_steps: int, start: float) -> bool:
    if progress["step"] >= total_steps:
        return True
    return bool(cfg.max_minutes) and time.time() - start >= 60 * cfg.max_minutes


def _fraction(cfg: TrainConfig, progress: dict, total_steps: int, start: float) -> float:
    f = progress["step"] / total_steps
    if cfg.max_minutes:
        f = max(f, (time.time() - start) / (60 * cfg.max_minutes))
    return min(1.0, f)


def _schedule_steps(cfg: TrainConfig, step: int, total_steps: int, start: float) -> int:
    """Steps the LR schedule spans. Under a time budget, project the steps that will fit from the
    pace so far, so the schedule still decays before time runs out."""
    if not cfg.max_minutes or step < 10:
        return total_steps
    used = (time.time() - start) / (60 * cfg.max_minutes)
    return min(total_steps, max(step + 1, int(step / max(used, 1e-9))))
