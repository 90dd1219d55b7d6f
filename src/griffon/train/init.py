"""Starting a run from a trained model: ``griffon train --init SRC``.

``SRC`` is a run (its newest checkpoint), a checkpoint directory (``save_pretrained``, ``griffon
convert``, a run's ``checkpoints/step_N``), a LoRA run or checkpoint (its adapters merged into its
base, as every reader reads it) or an HF RecurrentGemma directory (``griffon export-hf``'s output,
or a RecurrentGemma download), converted as it is read. SRC is recorded by its absolute path (and
as given, ``init_given``), so the run reads it from any directory; :func:`fingerprint` records
its weight files, so a LoRA run, whose checkpoints hold adapters only, refuses a base that has
changed since. The new run takes
SRC's model config and its tokenizer; it is a new run (its own directory, step 0, the optimizer
from scratch) whose weights at step 0 are SRC's. ``--set model.*`` may change what leaves every
tensor's shape as it is (the logit soft cap, say); a change of shape is refused, naming the tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from griffon.checkpoint import (
    ADAPTER_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_state_dict_shapes,
    is_adapter,
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
    adapter: bool = False
    """A LoRA checkpoint: adapters only, read merged into their base."""

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
        return cls(ckpt, load_config(ckpt), False, spec, adapter=is_adapter(ckpt))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape in griffon's names, read without loading a weight where the file allows."""
        if self.adapter:  # merged into its base: the shapes of its config's model
            with torch.device("meta"):
                return {k: tuple(v.shape) for k, v in Griffon(self.config).state_dict().items()}
        if not self.hf:
            return tensor_shapes(self.path / WEIGHTS_NAME)
        return {name: tuple(t.shape) for name, t in self.state_dict().items()}

    def weight_files(self) -> list[Path]:
        """The files SRC's weights are read from (a LoRA checkpoint's: its adapters; its base's are
        checked when it is read)."""
        if self.adapter:
            return [self.path / ADAPTER_NAME]
        if not self.hf:
            return [self.path / WEIGHTS_NAME]
        return sorted(self.path.glob("*.safetensors"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """SRC's weights, in griffon's names."""
        if self.adapter:
            from griffon.train.lora import load_merged

            return {k: v.contiguous() for k, v in load_merged(self.path).state_dict().items()}
        if not self.hf:
            return read_safetensors(self.path / WEIGHTS_NAME)
        from griffon.convert import from_hf_state_dict

        state: dict[str, torch.Tensor] = {}
        for f in sorted(self.path.glob("*.safetensors")):
            state.update(read_safetensors(f))
        return from_hf_state_dict(state, self.config)


def fingerprint(source: InitSource) -> list[dict[str, Any]]:
    """SRC's weight files as they are now: name, size, modification time and SHA-256 of each."""
    out = []
    for f in source.weight_files():
        stat = f.stat()
        out.append({"file": f.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(f)})
    return out


def check_fingerprint(source: InitSource, recorded: list[dict[str, Any]]) -> None:
    """Refuse, naming SRC, weight files that differ from ``recorded`` (:func:`fingerprint`): a file
    of the same size and modification time is taken as unchanged, another is hashed."""
    files = {f.name: f for f in source.weight_files()}
    for entry in recorded:
        f = files.get(entry["file"])
        if f is None:
            raise CheckpointError(f"the base model {source.path} has no {entry['file']} any more")
        stat = f.stat()
        if (stat.st_size, stat.st_mtime_ns) == (entry["size"], entry["mtime_ns"]):
            continue
        if stat.st_size != entry["size"] or _sha256(f) != entry["sha256"]:
            raise CheckpointError(
                f"the base model {source.path} has changed since the adapters were trained on it "
                f"({entry['file']} differs); restore it, or use the merged model exported before"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**22):
            digest.update(block)
    return digest.hexdigest()


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


def init_config(
    d: dict[str, Any], source: InitSource, overrides: list[str], given: str | None = None
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


@dataclass(frozen=True)
class InitWeights:
    """SRC's weights, read and checked (every tensor finite)."""

    source: InitSource
    state: dict[str, torch.Tensor]


def read_init_weights(src: str | Path, recorded: list[dict[str, Any]] | None = None) -> InitWeights:
    """SRC's weights, every tensor checked finite; with ``recorded`` (a :func:`fingerprint`),
    SRC refused if its weight files have changed since. A run reads them before it writes anything."""
    source = InitSource.open(src)
    if recorded is not None:
        check_fingerprint(source, recorded)
    state = source.state_dict()
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"--init {src}: tensor {name!r} contains NaN or Inf")
    return InitWeights(source, state)


def load_init_weights(
    model: Griffon, src: str | Path | InitWeights, recorded: list[dict[str, Any]] | None = None
) -> InitSource:
    """Copy SRC's weights (or those :func:`read_init_weights` read) into ``model`` (built from the
    config :func:`init_config` made); ``recorded`` as for :func:`read_init_weights`."""
    weights = src if isinstance(src, InitWeights) else read_init_weights(src, recorded)
    shapes = {k: tuple(v.shape) for k, v in weights.state.items()}
    check_state_dict_shapes(model.state_dict(), shapes, str(weights.source.path))
    model.load_state_dict(weights.state)
    return weights.source
