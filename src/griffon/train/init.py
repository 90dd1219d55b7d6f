"""Starting a run from a trained model: ``griffon train --init SRC``.

``SRC`` is a run (its newest checkpoint), a checkpoint directory (``save_pretrained``, ``griffon
convert``, a run's ``checkpoints/step_N``) or an HF RecurrentGemma directory (``griffon
export-hf``'s output, or a RecurrentGemma download), converted as it is read. The new run takes
SRC's model config and its tokenizer; it is a new run (its own directory, step 0, the optimizer
from scratch) whose weights at step 0 are SRC's. ``--set model.*`` may change what leaves every
tensor's shape as it is (the logit soft cap, say); a change of shape is refused, naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from griffon.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    check_state_dict_shapes,
    load_config,
    read_safetensors,
    resolve,
    tensor_shapes,
)
from griffon.config import ConfigError, ModelConfig
from griffon.model import Griffon


@dataclass(frozen=True)
class InitSource:
    """A model a run starts from: where its weights are, its config and its tokenizer."""

    path: Path
    """The checkpoint or HF directory the weights are read from."""
    config: ModelConfig
    hf: bool
    """An HF RecurrentGemma directory (its tensors are renamed as they are read)."""
    tokenizer: str | None
    """The tokenizer, as ``data.tokenizer`` names one (``bytes`` or a file); None if SRC has none."""

    @classmethod
    def open(cls, src: str | Path) -> InitSource:
        """Find SRC's weights, config and tokenizer; nothing is loaded yet. Raises
        :class:`CheckpointError` with one line if SRC is none of the forms above."""
        path = Path(src)
        if not path.exists():
            raise CheckpointError(f"--init {src}: not found")
        hf = _hf_config(path)
        if hf is not None:
            from griffon.convert import ConversionError, config_from_hf

            try:
                config = config_from_hf(hf)
            except (ConversionError, ConfigError) as e:
                raise CheckpointError(f"--init {src}: {e}") from None
            if not list(path.glob("*.safetensors")):
                raise CheckpointError(f"--init {src}: an HF directory without *.safetensors weights")
            return cls(path, config, True, _tokenizer_file(path))
        ckpt, tokenizer = resolve(path)
        spec = None
        if tokenizer is not None:
            spec = "bytes" if tokenizer.kind == "bytes" else str(tokenizer.path)
        return cls(ckpt, load_config(ckpt), False, spec)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape in griffon's names, read without loading a weight where the file allows."""
        if not self.hf:
            return tensor_shapes(self.path / WEIGHTS_NAME)
        return {name: tuple(t.shape) for name, t in self.state_dict().items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """SRC's weights, in griffon's names."""
        if not self.hf:
            return read_safetensors(self.path / WEIGHTS_NAME)
        from griffon.convert import from_hf_state_dict

        state: dict[str, torch.Tensor] = {}
        for f in sorted(self.path.glob("*.safetensors")):
            state.update(read_safetensors(f))
        return from_hf_state_dict(state, self.config)


def _hf_config(path: Path) -> dict | None:
    """The ``config.json`` of an HF directory (it names a ``model_type``), else None."""
    import json

    try:
        d = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and "model_type" in d else None


def _tokenizer_file(directory: Path) -> str | None:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (directory / name).is_file():
            return str(directory / name)
    return None


def init_config(d: dict[str, Any], source: InitSource, overrides: list[str]) -> dict[str, Any]:
    """The train-config dict ``d`` of a run started from ``source``: SRC's model config with the
    ``model.*`` overrides applied (any that changes a tensor's shape refused), SRC's tokenizer as
    ``data.tokenizer`` (a different one set with ``--set`` refused), and ``init`` naming SRC."""
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
        check_state_dict_shapes(expected, source.shapes(), str(source.path))
    except CheckpointError as e:
        raise ConfigError(
            f"--set {' '.join(model_overrides)} changes the model's shapes, which --init keeps: {e}"
        ) from None
    d = {**d, "model": model.to_dict(), "init": str(source.path)}
    data = dict(d.get("data") or {})
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "data.tokenizer"]
    if source.tokenizer is None:
        if not chosen:
            raise ConfigError(
                f"--init {source.path} has no tokenizer: name the one its model reads with --set data.tokenizer=FILE"
            )
    elif chosen and chosen[-1] != source.tokenizer:
        raise ConfigError(
            f"--init {source.path} reads with the tokenizer {source.tokenizer}; drop --set data.tokenizer"
        )
    else:
        data["tokenizer"] = source.tokenizer
    d["data"] = data
    return d


def load_init_weights(model: Griffon, src: str | Path) -> None:
    """Copy SRC's weights into ``model`` (built from the config :func:`init_config` made)."""
    source = InitSource.open(src)
    state = source.state_dict()
    check_state_dict_shapes(model.state_dict(), {k: tuple(v.shape) for k, v in state.items()}, str(source.path))
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"--init {src}: tensor {name!r} contains NaN or Inf")
    model.load_state_dict(state)
