"""Run checkpoints: model, optimizer, progress, RNG and data position, written atomically.

``RUN/checkpoints/step_000100/`` holds ``config.json`` + ``model.safetensors`` (a loadable
griffon checkpoint), ``optimizer.pt`` and ``state.json``. Each is written into a temporary
directory that is renamed into place when complete; only the newest ``keep`` survive.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from griffon.checkpoint import CheckpointError, from_pretrained, save_pretrained
from griffon.model import Griffon


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "state.json").is_file())


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    model: Griffon,
    optimizer_state: dict,
    progress: dict[str, Any],
    keep: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step_{progress['step']}`` atomically, then drop all but the newest ``keep``.
    ``extra`` joins the optimizer and RNG state in ``optimizer.pt`` (training-only state)."""
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise CheckpointError(f"refusing to save a checkpoint: parameter {name!r} is not finite")
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{progress['step']:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_step_", dir=root))
    try:
        save_pretrained(model, tmp)
        torch.save({"optimizer": optimizer_state, "rng": rng_state(), **(extra or {})}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(progress, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model: Griffon) -> tuple[dict, dict[str, Any]]:
    """Load weights into ``model``; return (optimizer+rng payload, progress)."""
    try:
        loaded = from_pretrained(path)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from None
    if loaded.config.to_dict() != model.config.to_dict():
        raise CheckpointError(f"checkpoint {path} was made with another model config than this run's")
    model.load_state_dict(loaded.state_dict())
    try:
        payload = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        progress = json.loads((path / "state.json").read_text())
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated: {str(e).splitlines()[0]}") from None
    return payload, progress
