"""Run state: a training run's checkpoints of model, optimizer, progress and data position,
written atomically and read without pickle.

``RUN/checkpoints/step_000100/`` holds ``config.json`` + ``model.safetensors`` (a loadable
griffon checkpoint), ``optimizer.safetensors`` (optimizer state and any other training-only
tensors, :mod:`griffon.tensor_tree`) and ``state.json`` (progress and data position). The
directory is written under a temporary name and renamed when complete; only the newest ``keep``
survive. Nothing in a checkpoint is unpickled: a run directory from a stranger runs no code.

Training draws nothing from the global random number generators (the data order and the
self-guided draws are seeded by step), so no RNG state is saved: resuming is exact without it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from griffon.atomic import atomic_directory, describe_os_error, remove_tree
from griffon.checkpoint import CONFIG_NAME, CheckpointError, from_pretrained, is_adapter, load_config, write_model
from griffon.checkpoint.adapters import load_adapter, save_adapter
from griffon.model import Griffon
from griffon.run import Run
from griffon.tensor_tree import TreeFileError, load_tree, save_tree

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "state.json"
# Written by earlier griffon versions; read only as a restricted (weights-only) pickle.
LEGACY_OPTIMIZER_NAME = "optimizer.pt"


@dataclass
class Progress:
    """How far a run has come: what ``state.json`` holds."""

    step: int = 0
    """Optimizer steps taken."""
    tokens: int = 0
    """Training tokens consumed, all ranks together."""
    flops: float = 0.0
    """Training FLOPs spent (:mod:`griffon.accounting`, the self-guided guides included)."""
    elapsed: float = 0.0
    """Seconds of training so far, across resumes."""
    loader: dict[str, int] = field(default_factory=dict)
    """The data loader's position (:meth:`griffon.data.loader.PackedLoader.state_dict`)."""

    @classmethod
    def read(cls, path: Path) -> Progress:
        """Read ``state.json``; :class:`CheckpointError` naming the file for anything malformed."""
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is corrupted or truncated: {e}") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path} does not hold a JSON object")
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise CheckpointError(f"{path} lacks field(s) {', '.join(missing)}")
        for k in ("step", "tokens"):
            if not isinstance(d[k], int) or d[k] < 0:
                raise CheckpointError(f"{path}: {k} must be a non-negative integer, got {d[k]!r}")
        if not all(isinstance(d[k], (int, float)) and math.isfinite(d[k]) for k in ("flops", "elapsed")):
            raise CheckpointError(f"{path}: flops and elapsed must be finite numbers")
        if not isinstance(d["loader"], dict):
            raise CheckpointError(f"{path}: loader must be an object")
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def check_weights(model: Griffon, max_abs: float | None) -> None:
    """Raise :class:`CheckpointError` if a weight is NaN/Inf or larger in magnitude than ``max_abs``:
    a finite step can still blow the weights up, and such a checkpoint would be the one resumed."""
    for name, p in model.state_dict().items():
        if not p.is_floating_point():
            continue
        if not torch.isfinite(p).all():
            raise CheckpointError(f"refusing to save a checkpoint: parameter {name!r} is not finite")
        largest = p.detach().abs().max().item() if p.numel() else 0.0
        if max_abs is not None and largest > max_abs:
            raise CheckpointError(
                f"refusing to save a checkpoint: parameter {name!r} has a weight of magnitude {largest:.3g} "
                f"(limit max_weight_abs={max_abs:g}); the weights have exploded"
            )


def save_checkpoint(
    run: Run,
    model: Griffon,
    training_state: dict[str, Any],
    progress: Progress,
    keep: int,
    max_weight_abs: float | None = None,
    adapter: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step_{progress.step}`` atomically, then drop all but the newest ``keep``.

    ``training_state`` (the optimizer's ``state_dict`` and whatever else training needs, a tree
    of tensors, numbers and strings) goes to ``optimizer.safetensors``; ``progress`` to ``state.json``.
    With ``adapter`` (a LoRA run's settings and base), the model's LoRA adapters are written in
    place of its weights (:mod:`griffon.checkpoint.adapters`).
    """
    check_weights(model, max_weight_abs)
    older = run.checkpoints()  # refuses a checkpoints folder that is a link before writing into it
    final = run.checkpoint(progress.step)
    try:
        with atomic_directory(final) as tmp:
            if adapter is None:
                write_model(model, tmp)
            else:
                save_adapter(model, tmp, adapter)
                (tmp / CONFIG_NAME).write_text(model.config.to_json())
            save_tree(training_state, tmp / OPTIMIZER_NAME)
            (tmp / STATE_NAME).write_text(progress.to_json())
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot write checkpoint {final}: {describe_os_error(e)}") from None
    kept = [p for p in older if p != final] + [final]
    for old in kept[:-keep]:  # griffon's own checkpoints only (Run.checkpoints)
        remove_tree(old)
    return final


def load_checkpoint(path: Path, model: Griffon) -> tuple[dict[str, Any], Progress]:
    """Load weights into ``model``; return (training state, progress).

    Raises :class:`CheckpointError` naming the file for anything missing, corrupt or made by another config.
    """
    if is_adapter(path):  # a LoRA run: ``model`` holds the base weights and adapters to load into
        try:
            saved = load_config(path)
            if saved.to_dict() != model.config.to_dict():
                raise CheckpointError(f"checkpoint {path} was made with another model config than this run's")
            load_adapter(model, path)
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume from {path}: {e}") from None
        return _read_training_state(path), Progress.read(path / STATE_NAME)
    try:
        loaded = from_pretrained(path)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from None
    if loaded.config.to_dict() != model.config.to_dict():
        raise CheckpointError(f"checkpoint {path} was made with another model config than this run's")
    training_state = _read_training_state(path)
    progress = Progress.read(path / STATE_NAME)
    model.load_state_dict(loaded.state_dict())
    return training_state, progress


def _read_training_state(path: Path) -> dict[str, Any]:
    if (path / OPTIMIZER_NAME).is_file() or not (path / LEGACY_OPTIMIZER_NAME).is_file():
        try:
            state = load_tree(path / OPTIMIZER_NAME)
        except TreeFileError as e:
            raise CheckpointError(f"checkpoint {path} is corrupted or truncated: {e}") from None
    else:
        try:  # weights_only: torch's restricted unpickler, which builds tensors and containers only
            state = torch.load(path / LEGACY_OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad or hostile pickles
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(f"cannot read {path / LEGACY_OPTIMIZER_NAME} (weights only): {first}") from None
    if not isinstance(state, dict) or "optimizer" not in state:
        raise CheckpointError(f"checkpoint {path}: the training state holds no optimizer state")
    return state
