"""Starting a run from a trained model: ``griffon train --init SRC``.

``SRC`` is any model :func:`griffon.checkpoint.open_source` opens: a run, a checkpoint, a LoRA run
or checkpoint (read merged), an HF RecurrentGemma directory. The new run takes SRC's model config
and its tokenizer; it is a new run (its own directory, step 0, the optimizer from scratch) whose
weights at step 0 are SRC's, read and checked before the run writes anything. SRC is recorded by
its absolute path (``init``; ``init_given`` as it was given), so the run reads it from any
directory. ``--set model.*`` may change what leaves every tensor's shape as it is (the logit soft
cap, say); a change of shape is refused, naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from griffon.checkpoint import CheckpointError, ModelSource, check_state_dict_shapes, open_source
from griffon.config import ConfigError, ModelConfig
from griffon.model import Griffon


def open_init(src: str | Path) -> ModelSource:
    """SRC opened (:func:`~griffon.checkpoint.open_source`), its errors prefixed with ``--init``."""
    try:
        return open_source(src)
    except CheckpointError as e:
        raise CheckpointError(f"--init {e}" if str(e).startswith(str(src)) else f"--init {src}: {e}") from None


def init_config(
    d: dict[str, Any], source: ModelSource, overrides: list[str], given: str | None = None
) -> dict[str, Any]:
    """The train-config dict ``d`` of a run started from ``source``: SRC's model config with the
    ``model.*`` overrides applied (any that changes a tensor's shape refused), SRC's tokenizer as
    ``data.tokenizer`` (a different one set with ``--set`` refused), ``init`` naming SRC by its
    absolute path and ``init_given`` as the user wrote it."""
    from griffon.config import apply_overrides

    model_overrides = [o for o in overrides if o.split("=", 1)[0].startswith("model.")]
    if any(o.split("=", 1)[0] == "model" for o in overrides):
        raise ConfigError("--init takes the model from SRC: drop --set model=...")
    model = ModelConfig.from_dict(
        apply_overrides(source.config.to_dict(), [o[len("model.") :] for o in model_overrides])
    )
    with torch.device("meta"):
        expected = Griffon(model).state_dict()
    try:
        shapes = source.shapes()
    except CheckpointError as e:
        raise CheckpointError(f"--init {source.path}: {e}") from None
    if model_overrides:
        try:
            check_state_dict_shapes(expected, shapes, str(source.path))
        except CheckpointError as e:
            raise ConfigError(
                f"--set {' '.join(model_overrides)} changes the model's shapes, which --init keeps: {e}"
            ) from None
    else:
        check_state_dict_shapes(expected, shapes, str(source.path))
    d = {**d, "model": model.to_dict(), "init": str(source.path.resolve()), "init_given": given}
    data = dict(d.get("data") or {})
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "data.tokenizer"]
    if source.tokenizer_spec is None:
        if not chosen:
            raise ConfigError(
                f"--init {source.path} has no tokenizer: name the one its model reads with --set data.tokenizer=FILE"
            )
    elif chosen and chosen[-1] != source.tokenizer_spec:
        raise ConfigError(
            f"--init {source.path} reads with the tokenizer {source.tokenizer_spec}; drop --set data.tokenizer"
        )
    else:
        data["tokenizer"] = source.tokenizer_spec
    d["data"] = data
    return d


@dataclass(frozen=True)
class InitWeights:
    """SRC's weights, read and checked (every tensor finite)."""

    source: ModelSource
    state: dict[str, torch.Tensor]


def read_init_weights(src: str | Path, recorded: list[dict[str, Any]] | None = None) -> InitWeights:
    """SRC's weights, every tensor checked finite; with ``recorded`` (a
    :func:`~griffon.checkpoint.fingerprint`), SRC refused if its weight files have changed since.
    A run reads them before it writes anything."""
    source = open_init(src)
    try:
        return InitWeights(source, source.checked_state_dict(recorded))
    except CheckpointError as e:
        raise CheckpointError(f"--init {e}") from None


def load_init_weights(
    model: Griffon, src: str | Path | InitWeights, recorded: list[dict[str, Any]] | None = None
) -> ModelSource:
    """Copy SRC's weights (or those :func:`read_init_weights` read) into ``model`` (built from the
    config :func:`init_config` made); ``recorded`` as for :func:`read_init_weights`."""
    weights = src if isinstance(src, InitWeights) else read_init_weights(src, recorded)
    shapes = {k: tuple(v.shape) for k, v in weights.state.items()}
    check_state_dict_shapes(model.state_dict(), shapes, str(weights.source.path))
    model.load_state_dict(weights.state)
    return weights.source
