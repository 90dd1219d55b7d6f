"""The training loop: ``train(config, run)``.

The model stays single-device code; :mod:`griffon.train.parallelize` wraps it (precision,
activation checkpointing, DDP/FSDP2) from outside. This module feeds it packed documents and runs
the loop; what it writes goes where the run directory (:class:`griffon.run.Run`) says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from griffon.accounting import check_buildable, self_guided_flops_per_token, train_flops_per_token
from griffon.align.chat import run_template, save_template
from griffon.allocator import keep_freed_memory
from griffon.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    check_matches,
    fingerprint,
    is_adapter,
    load_config,
    tensor_shapes,
)
from griffon.checkpoint.adapters import apply_lora, lora_targets, read_adapter_meta
from griffon.config import LinearStructure
from griffon.data.training_data import TrainingData
from griffon.machine import free_memory
from griffon.model import Griffon
from griffon.nn.moe import discard_router_stats, router_loss, update_routers
from griffon.run import Run
from griffon.train import distributed as D
from griffon.train.config import TrainConfig
from griffon.train.init import InitWeights, load_init_weights, read_init_weights
from griffon.train.logging import RunLogger, plot_losses, plot_moe_load
from griffon.train.objective import OBJECTIVES, Loader, Objective, RunData, Start
from griffon.train.optim import adaptive_grad_clip, lr_at, make_optimizer
from griffon.train.parallelize import (
    apply_activation_checkpointing,
    autocast,
    full_state_dicts,
    load_optimizer_state,
    parallelize,
    resolve_device,
    resolve_dtype,
)
from griffon.train.self_guided import GuidedPhase, plan_guided_run
from griffon.train.signals import StopRequest, TrainingInterrupted
from griffon.train.state import Progress, load_checkpoint, save_checkpoint


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


# Share of the time left that a re-planned token budget leaves unplanned: checkpoints, and the pace
# drifting (timings on a shared machine move by 20-50% within minutes).
REPLAN_MARGIN = 0.05
# The re-plan waits for this share of the time budget, so that the pace it measures is the settled one.
REPLAN_AFTER = 0.1


def prepare_data(cfg: TrainConfig, data: TrainingData, own: Path, is_main: bool) -> Path:
    """The directory of ``data``'s prepared tokens, for what reads them outside a run (sweeps,
    ``model=auto``, benchmarks): raw text is prepared into ``own`` by the main process while the
    others wait (:meth:`TrainingData.prepare`)."""
    if is_main:
        data.prepare(own, cfg.data.tokenizer, cfg.data.val_fraction, cfg.data.verify)
    D.barrier()
    return data.directory(own)


def train(
    cfg: TrainConfig,
    run: Run | str | Path,
    resume: bool = False,
    checkpoint: str | None = None,
    data: RunData | None = None,
) -> TrainResult:
    """Train (or resume) ``run`` (a :class:`~griffon.run.Run` or its directory) according to ``cfg``.

    Nothing is written before the config and data have been checked, and the run directory holds
    a run (its ``config.json``) only once it is complete. One process trains a run at a time (an
    exclusive lock on the directory). Resuming a run with no checkpoint starts it from step 0;
    ``checkpoint`` names the checkpoint to resume from (default: the newest). The run's data are
    opened as its objective says (:data:`griffon.train.objective.OBJECTIVES`), or given: ``data``,
    made by the caller for the objective (the probes' examples). On SIGINT or SIGTERM the current
    step completes, a checkpoint is saved and :class:`TrainingInterrupted` is raised.
    """
    run = run if isinstance(run, Run) else Run(run)
    if data is None:
        data = OBJECTIVES[cfg.objective].open_data(cfg, run)
    for warning in data.warnings():
        sys.stderr.write(warning + "\n")
    if cfg.lora.rank:  # before anything is written
        with torch.device("meta"):
            lora_targets(Griffon(cfg.model), cfg.lora.targets)
    # A new run's starting weights are read and checked before anything is written: a refused
    # start leaves nothing behind.
    init = read_init_weights(cfg.init) if cfg.init is not None and not resume else None
    device = resolve_device(cfg.device)
    if resume:  # before the model is built: an edited config.json must not allocate first and fail later
        _check_resumable(run, cfg, checkpoint)
    # Float32 weights, gradients and Adam's two moments; a LoRA run trains adapters only.
    check_buildable(cfg.model, 4 if cfg.lora.rank else 16, free_memory(device), "training this model")
    info = D.init_distributed(cfg.distributed, device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    keep_freed_memory()
    try:
        with run.lock() if info.is_main else contextlib.nullcontext():
            result = _train(cfg, run, data, resume, checkpoint, device, info, init)
        # Every rank done (the main one plots after the loop) before any tears down its process
        # group: a gloo rank whose peer is still busy may abort in the teardown.
        D.barrier()
        return result
    finally:
        D.shutdown()


def _train(
    cfg: TrainConfig,
    run: Run,
    data: RunData,
    resume: bool,
    checkpoint: str | None,
    device: torch.device,
    info: D.DistInfo,
    init: InitWeights | None = None,
) -> TrainResult:
    _open_run(cfg, run, data, resume, info)

    torch.manual_seed(cfg.seed)
    raw = Griffon(cfg.model).to(device)
    # A LoRA run's checkpoints hold adapters only: its base weights come from SRC every time, and
    # must be the ones the adapters were trained on (their fingerprint is saved with them).
    base_weights = None
    point = run.resume_point(checkpoint) if resume else None
    if cfg.init is not None and (cfg.lora.rank or point is None):
        if cfg.lora.rank and point is not None and is_adapter(point):
            base_weights = read_adapter_meta(point).get("base_weights")
        source = load_init_weights(raw, init if init is not None else cfg.init, base_weights)
        del init  # the model holds the weights now
        if cfg.lora.rank and base_weights is None:
            base_weights = fingerprint(source)
    # before LoRA's adapters: an objective may read the model as it starts (DPO's reference policy)
    objective = OBJECTIVES[cfg.objective].build(cfg, data, Start(raw, run, device, info.is_main))
    adapter = None  # what a LoRA run's checkpoints record beside the adapters
    if cfg.lora.rank:
        lora = cfg.lora
        targets = lora_targets(raw, lora.targets)
        apply_lora(raw, lora.rank, lora.alpha, lora.dropout, targets)
        adapter = {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(targets),
                   "base": cfg.init, "base_weights": base_weights}  # fmt: skip
    loader = data.loader(cfg.data.batch_size, cfg.seed, info.rank, info.world_size)
    plan = plan_run(cfg, loader.steps_per_epoch, info.world_size)
    guided = GuidedPhase(raw, cfg.self_guided, cfg.seed, plan.guide_steps, plan.guide_flops_per_token)
    resumed = run.resume(checkpoint, lambda p: load_checkpoint(p, raw), info.is_main) if resume else None
    training_state, progress = resumed if resumed is not None else (None, Progress())
    if training_state is not None:
        loader.load_state_dict(progress.loader)
        guided.resume(progress.step, training_state)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(raw)
    model = parallelize(raw, cfg.distributed, device)
    opt = make_optimizer(raw, cfg.optim)  # after parallelize: FSDP2 replaces the parameters with shards
    guided.add_to(opt, cfg.optim.weight_decay)
    if training_state is not None:
        load_optimizer_state(model, opt, cfg.distributed, training_state["optimizer"])
    if cfg.compile:
        model = torch.compile(model)

    session = _Session(cfg, run, info, device, raw, model, opt, loader, guided, progress, plan,
                       autocast(device, resolve_dtype(cfg.dtype, device)),
                       saved_step=progress.step if training_state is not None else None, adapter=adapter,
                       objective=objective)  # fmt: skip

    def evaluate_on(max_batches: int | None) -> dict[str, float]:
        batches = data.eval_batches(cfg.data.batch_size, max_batches)
        return objective.evaluate(model, batches, device, session.autocast, D.all_reduce_mean)

    logger = RunLogger(run, info.is_main, truncate_after_step=progress.step if resume else None)
    stop = StopRequest()
    last_eval: dict = {}
    try:
        while not session.done():
            if D.any_rank(stop.requested, device):
                session.save()
                raise TrainingInterrupted(
                    f"interrupted at step {progress.step}, checkpoint saved; continue with: "
                    f"griffon train --resume {run.root}"
                )
            if progress.step == plan.reread_from:  # the extra steps re-read the guided phase's batches
                loader.load_state_dict({"epoch": 0, "step": 0, "seed": cfg.seed})
            lr = session.set_lr()
            extra_flops_per_token = guided.before_step(progress.step)
            loss = session.forward_backward()
            grad_norm = session.clip()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                session.skip(logger, loss, grad_norm)
                continue
            session.bad_steps = 0
            opt.step()
            opt.zero_grad(set_to_none=True)
            session.stats |= update_routers(raw, cfg.model.moe, D.all_reduce_sum)
            progress.step += 1
            progress.tokens += plan.tokens_per_step
            progress.flops += plan.tokens_per_step * (plan.flops_per_token + extra_flops_per_token)
            guided.after_step(progress.step, opt)
            session.replan(lambda n: data.eval_batch_count(cfg.data.batch_size, n))

            step = progress.step
            session.log(logger, loss, lr, grad_norm)
            if step % cfg.eval_every == 0:
                last_eval = evaluate_on(cfg.eval_batches)
                logger.log({"kind": "eval", "step": step, "tokens": progress.tokens, **last_eval})
            if step % cfg.save_every == 0:
                session.save()
        last_eval = evaluate_on(cfg.final_eval_batches)
        logger.log({"kind": "final_eval", "step": progress.step, "tokens": progress.tokens, **last_eval})
        session.save()
    finally:
        stop.restore()
        logger.close()
    if info.is_main:
        plot_losses(run)
        plot_moe_load(run)
    return TrainResult(
        steps=progress.step,
        tokens=progress.tokens,
        flops=progress.flops,
        val_loss=last_eval.get("val_loss"),
        val_bpb=last_eval.get("val_bpb"),
        tokens_per_s=progress.tokens / max(session.elapsed(), 1e-9),
    )


def _open_run(cfg: TrainConfig, run: Run, data: RunData, resume: bool, info: D.DistInfo) -> None:
    """Make ``run`` a run (or check that it is one) and prepare its data (the main process, while
    the others wait). The config is written last: until then the directory holds no run."""
    if info.is_main:
        if resume:
            run.check_resumable()
        else:
            run.check_new()
        run.clean()
        data.prepare()
        data.tokenizer.save(run.root)
        # The chat template travels with the run: every reader (sample, serve, export-hf) renders with it.
        renders_chats = OBJECTIVES[cfg.objective].renders_chats
        template = run_template(data.tokenizer, cfg.data.tokenizer, cfg.data.chat_template, renders_chats)
        if template is not None:
            save_template(template, run.root)
        run.write_config(cfg.to_json())
    D.barrier()


@dataclass
class RunPlan:
    """What a run will do, fixed before its first step."""

    tokens_per_step: int
    """Tokens per optimizer step, all ranks and micro-batches together."""
    flops_per_token: float
    """Training FLOPs per token of the model (:func:`griffon.accounting.train_flops_per_token`)."""
    total_steps: int
    """Steps the schedule spans (a time budget may stop earlier)."""
    guide_steps: int = 0
    """Self-guided training: the guided steps (the first ones)."""
    guide_flops_per_token: float = 0.0
    """Self-guided training: the guides' extra FLOPs per token on steps where they run."""
    reread_from: int | None = None
    """Self-guided ``fixed_flops`` with ``extra_steps_data=reread``: the step from which the run
    reads its data again from the start."""


def plan_run(cfg: TrainConfig, steps_per_epoch: int, world_size: int) -> RunPlan:
    """The run's steps from its budgets (the tightest wins) and, with self-guided training, its guided steps."""
    tokens_per_step = cfg.data.seq_len * cfg.data.batch_size * cfg.data.grad_accum * world_size
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    total_steps = _planned_steps(cfg, tokens_per_step, flops_per_token, steps_per_epoch)
    sg = cfg.self_guided
    if not sg.enabled:
        return RunPlan(tokens_per_step, flops_per_token, total_steps)
    guide_flops_per_token = self_guided_flops_per_token(cfg.model)
    dense_fpt = train_flops_per_token(cfg.model.replace(ffn_structure=LinearStructure()), cfg.data.seq_len)
    planned = total_steps
    if sg.mode == "fixed_flops":  # the budget is the dense model's: plan its steps
        planned = _planned_steps(cfg, tokens_per_step, dense_fpt, steps_per_epoch)
    total_steps, guide_steps = plan_guided_run(
        sg.fraction, sg.mode, sg.reduce_flop, cfg.seed, planned,
        step_flops=tokens_per_step * flops_per_token,
        guide_step_flops=tokens_per_step * guide_flops_per_token,
        dense_step_flops=tokens_per_step * dense_fpt,
        flop_budget=cfg.max_flops,
    )  # fmt: skip
    reread = sg.extra_steps_data == "reread" and total_steps > planned
    return RunPlan(tokens_per_step, flops_per_token, total_steps, guide_steps, guide_flops_per_token,
                   reread_from=planned if reread else None)  # fmt: skip


@dataclass
class _Session:
    """One training process's view of a run: what the loop's steps read and change."""

    cfg: TrainConfig
    run: Run
    info: D.DistInfo
    device: torch.device
    raw: Griffon
    """The model itself; ``model`` is it as wrapped for training (DDP, FSDP2, compile)."""
    model: nn.Module
    opt: torch.optim.Optimizer
    loader: Loader
    guided: GuidedPhase
    progress: Progress
    plan: RunPlan
    autocast: Callable[[], contextlib.AbstractContextManager]
    saved_step: int | None
    """The step of the newest checkpoint (None: none yet)."""
    adapter: dict | None = None
    """A LoRA run's settings and base, saved with its adapters (None: not a LoRA run)."""
    objective: Objective | None = None
    stats: dict[str, float] = field(default_factory=dict)
    """The objective's statistics of the last step, logged with it (DPO's margins, QRPO's rewards)."""
    bad_steps: int = 0
    start: float = field(default=0.0)
    window: tuple[float, int] = (0.0, 0)
    """(time, tokens) since the last logged step, for tokens/s."""
    tokens_per_s: float = 0.0
    pace_mark: tuple[float, int] | None = None
    """(elapsed, step) from which ``replan`` measures the pace."""

    def __post_init__(self) -> None:
        self.start = time.time() - self.progress.elapsed
        self.window = (time.time(), 0)

    def elapsed(self) -> float:
        return time.time() - self.start

    def done(self) -> bool:
        if self.progress.step >= self.plan.total_steps:
            return True
        return bool(self.cfg.max_minutes) and self.elapsed() >= 60 * self.cfg.max_minutes

    def replan(self, eval_batches_of: Callable[[int | None], int]) -> None:
        """With ``replan_tokens``, once, when a tenth of the time budget has passed
        (:data:`REPLAN_AFTER`) or half the planned steps, whichever comes first (all ranks agree on
        the step; at least 10 steps past warmup): set ``max_tokens`` to what the rest of
        the time fits at the pace measured since warmup (its first steps are slower: compilation,
        allocator, caches), less the evaluations to come (an evaluation batch costs about a third
        of a training step) and :data:`REPLAN_MARGIN`. ``eval_batches_of(n)`` is the number of
        batches an evaluation of at most ``n`` takes. The new budget and ``replanned_at`` (the
        steps before it keep the old schedule's learning rates) are saved in ``config.json`` with
        ``replan_tokens`` cleared, so a resume replays the same schedule."""
        cfg, step = self.cfg, self.progress.step
        if not cfg.replan_tokens or step < cfg.optim.warmup_steps:
            return
        if self.pace_mark is None:  # the pace is measured from here
            self.pace_mark = (self.elapsed(), step)
            return
        budget = 60 * cfg.max_minutes
        due = self.elapsed() >= REPLAN_AFTER * budget or step >= self.plan.total_steps // 2  # before the plan ends
        if step - self.pace_mark[1] < 10 or not D.any_rank(due, self.device):
            return
        elapsed = float(D.all_reduce_mean(torch.tensor(self.elapsed(), dtype=torch.float64, device=self.device)))
        mark = float(D.all_reduce_mean(torch.tensor(self.pace_mark[0], dtype=torch.float64, device=self.device)))
        per_step = (elapsed - mark) / (step - self.pace_mark[1])  # seconds
        periodic = eval_batches_of(cfg.eval_batches) / (3 * cfg.eval_every)  # of a step, per step
        final = eval_batches_of(cfg.final_eval_batches) * per_step / 3
        left = (budget - elapsed) * (1 - REPLAN_MARGIN) - final
        steps = step + max(int(left / (per_step * (1 + periodic))), 1)
        self.cfg = dataclasses.replace(
            cfg, max_tokens=steps * self.plan.tokens_per_step, replan_tokens=False,
            replanned_at=(step, self.plan.total_steps),
        )  # fmt: skip
        self.plan.total_steps = steps
        if self.info.is_main:
            self.run.write_config(self.cfg.to_json())

    def fraction(self) -> float:
        f = self.progress.step / self.plan.total_steps
        if self.cfg.max_minutes:
            f = max(f, self.elapsed() / (60 * self.cfg.max_minutes))
        return min(1.0, f)

    def set_lr(self) -> float:
        """Set the learning rate of the step about to run. Under a time budget the schedule spans
        the steps that will fit at the pace so far, so that it still decays before time runs out."""
        step, steps = self.progress.step, self.plan.total_steps
        if self.cfg.replanned_at is not None and step < self.cfg.replanned_at[0]:
            steps = self.cfg.replanned_at[1]  # the schedule these steps had before the re-plan
        if self.cfg.max_minutes and step >= 10:
            used = self.elapsed() / (60 * self.cfg.max_minutes)
            steps = min(steps, max(step + 1, int(step / max(used, 1e-9))))
        lr = lr_at(step, steps, self.cfg.optim)
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def forward_backward(self) -> float:
        """Accumulate the gradients of one optimizer step; return its mean loss over all ranks."""
        cfg, accum = self.cfg, self.cfg.data.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            batch = tuple(t.to(self.device) for t in next(self.loader))
            # DDP reduces gradients on the last micro-batch only
            sync = micro == accum - 1 or cfg.distributed != "ddp"
            with contextlib.nullcontext() if sync else self.model.no_sync(), self.autocast():
                loss, self.stats = self.objective.loss(self.model, batch)
                router, router_stats = router_loss(self.raw, cfg.model.moe)
            self.stats |= router_stats
            ((loss if router is None else loss + router) / accum).backward()
            loss_sum += loss.detach()
        return D.all_reduce_mean(loss_sum / accum).item()

    def clip(self) -> float:
        """Clip the gradients (AGC, then the global norm, the guides included); return the norm."""
        D.all_reduce_grads_(self.guided.parameters())  # the guides live outside the DDP wrapper
        if self.cfg.optim.agc is not None:
            adaptive_grad_clip(self.raw, self.cfg.optim.agc)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(list(self.model.parameters()) + self.guided.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def skip(self, logger: RunLogger, loss: float, grad_norm: float) -> None:
        """Drop a step with a non-finite loss or gradient; stop after ``max_bad_steps`` in a row."""
        self.bad_steps += 1
        self.opt.zero_grad(set_to_none=True)
        discard_router_stats(self.raw)
        logger.log({"kind": "skip", "step": self.progress.step + 1, "loss": loss, "grad_norm": grad_norm})
        if self.bad_steps >= self.cfg.max_bad_steps:
            newest = (
                "no checkpoint was saved yet"
                if self.saved_step is None
                else f"the newest checkpoint (step {self.saved_step}) is from before them"
            )
            raise TrainingError(
                f"stopping: {self.bad_steps} steps in a row had a non-finite loss or gradient "
                f"(last loss {loss}); {newest}"
            )

    def log(self, logger: RunLogger, loss: float, lr: float, grad_norm: float) -> None:
        step = self.progress.step
        t0, tokens = self.window
        tokens += self.plan.tokens_per_step
        if step % self.cfg.log_every == 0 or step == 1:
            now = time.time()
            self.tokens_per_s = tokens / max(now - t0, 1e-9)
            t0, tokens = now, 0
            record = {"kind": "train", "step": step, "tokens": self.progress.tokens, "loss": loss, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": self.tokens_per_s, "time": now - self.start}  # fmt: skip
            logger.log(record | self.stats | self.guided.log_fields())
        self.window = (t0, tokens)
        logger.progress(step, self.fraction(), self.tokens_per_s, loss)

    def save(self) -> None:
        """Checkpoint the current step (unless it is already saved)."""
        if self.saved_step == self.progress.step:
            return
        self.progress.loader, self.progress.elapsed = self.loader.state_dict(), self.elapsed()
        model_sd, opt_sd = full_state_dicts(self.model, self.raw, self.opt, self.cfg.distributed)
        if self.info.is_main:
            to_save = self.raw
            if self.cfg.distributed == "fsdp":
                to_save = Griffon(self.cfg.model)
                to_save.load_state_dict(model_sd)
            training_state = {"optimizer": opt_sd} | self.guided.state()
            try:
                save_checkpoint(self.run, to_save, training_state, self.progress, self.cfg.keep_checkpoints,
                                self.cfg.max_weight_abs, adapter=self.adapter)  # fmt: skip
            except CheckpointError as e:
                newest = "none was saved before" if self.saved_step is None else f"the newest is step {self.saved_step}"
                raise TrainingError(f"stopping at step {self.progress.step}: {e}; {newest}") from None
        D.barrier()
        self.saved_step = self.progress.step


def _check_resumable(run: Run, cfg: TrainConfig, name: str | None) -> None:
    """The checkpoint to resume from (:meth:`Run.resume_point`) matches the run's model config,
    tensor by tensor, read from its files' headers (:func:`griffon.checkpoint.check_matches`). A
    checkpoint whose files cannot be read is left to :meth:`Run.resume`, which names one that loads."""
    chosen = run.resume_point(name)
    if chosen is None:
        return
    if is_adapter(chosen):  # adapters only: loading them checks each against the model
        return
    try:
        saved, shapes = load_config(chosen), tensor_shapes(chosen / WEIGHTS_NAME)
    except CheckpointError:
        return
    check_matches(chosen, saved, shapes, cfg.model)


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
