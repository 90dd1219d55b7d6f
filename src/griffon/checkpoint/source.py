"""Opening a model from any path a user may give (:func:`open_source`).

A path is a run (its newest checkpoint), a checkpoint directory (``save_pretrained``, ``griffon
convert``, a run's ``checkpoints/step_N``), a LoRA run or checkpoint (adapters only: read merged
into the base model they were trained on, which must not have changed since) or an HF directory
of RecurrentGemma or of a Llama-family model (``griffon export-hf``'s output, or a download),
converted as it is read (a GGUF file is converted once, by ``griffon convert``). ``griffon train --init``, every command that reads a model (:func:`load_for_inference`,
:func:`from_pretrained`) and ``export-hf`` open models here. :func:`fingerprint` records a source's
weight files, so that a LoRA run, whose checkpoints hold adapters only, refuses a base that has
changed since it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from griffon.checkpoint.adapters import apply_lora, load_adapter, merge_lora, read_adapter_meta
from griffon.checkpoint.format import (
    ADAPTER_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_state_dict_shapes,
    inference_device,
    is_adapter,
    load_config,
    read_safetensors,
    resolve,
    tensor_shapes,
    tokenizer_dirs,
)
from griffon.config import ConfigError, ModelConfig
from griffon.data.tokenizers import Tokenizer, load_tokenizer
from griffon.files import CONFIG_BYTES, FileError, read_json, sha256
from griffon.model import Griffon


@dataclass(frozen=True)
class ModelSource:
    """A model on disk: where its weights are, its config and its tokenizer; nothing loaded yet."""

    path: Path
    """The checkpoint or HF directory the weights are read from."""
    config: ModelConfig
    kind: str
    """``checkpoint`` (griffon's files), ``lora`` (adapters only, read merged into their base) or
    ``hf`` (an HF RecurrentGemma or Llama-family directory, its tensors renamed as they are read)."""
    tokenizer: Tokenizer | None
    """Its tokenizer; None if it has none."""

    @property
    def tokenizer_spec(self) -> str | None:
        """The tokenizer as ``data.tokenizer`` names one (``bytes`` or a file)."""
        if self.tokenizer is None:
            return None
        return "bytes" if self.tokenizer.kind == "bytes" else str(self.tokenizer.path)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape in griffon's names, read without loading a weight where the file allows."""
        if self.kind == "lora":  # merged into its base: the shapes of its config's model
            with torch.device("meta"):
                return {k: tuple(v.shape) for k, v in Griffon(self.config).state_dict().items()}
        if self.kind == "checkpoint":
            return tensor_shapes(self.path / WEIGHTS_NAME)
        return {name: tuple(t.shape) for name, t in self.state_dict().items()}

    def weight_files(self) -> list[Path]:
        """The files its weights are read from (a LoRA checkpoint's: its adapters; its base's are
        checked when it is read)."""
        if self.kind == "lora":
            return [self.path / ADAPTER_NAME]
        if self.kind == "checkpoint":
            return [self.path / WEIGHTS_NAME]
        return sorted(self.path.glob("*.safetensors"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Its weights, in griffon's names (a LoRA source's: merged into its base)."""
        if self.kind == "lora":
            return {k: v.contiguous() for k, v in self._merged().state_dict().items()}
        if self.kind == "checkpoint":
            return read_safetensors(self.path / WEIGHTS_NAME)
        from griffon.checkpoint.convert import hf_state_dict

        state: dict[str, torch.Tensor] = {}
        for f in self.weight_files():
            state.update(read_safetensors(f))
        return hf_state_dict(state, self.config)

    def checked_state_dict(self, recorded: list[dict[str, Any]] | None = None) -> dict[str, torch.Tensor]:
        """:meth:`state_dict`, every tensor checked finite; with ``recorded`` (a :func:`fingerprint`),
        refused if its weight files have changed since."""
        if recorded is not None:
            check_fingerprint(self, recorded)
        state = self.state_dict()
        for name, t in state.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"{self.path}: tensor {name!r} contains NaN or Inf")
        return state

    def model(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Griffon:
        """The model, its weights checked against its config and checked finite."""
        if self.kind == "lora":
            return self._merged().to(device=device, dtype=dtype)
        state = self.checked_state_dict()
        with torch.device("meta"):
            model = Griffon(self.config)
        check_state_dict_shapes(model.state_dict(), {k: tuple(v.shape) for k, v in state.items()}, str(self.path))
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=dtype)

    def _merged(self) -> Griffon:
        """A LoRA checkpoint's model: its base (``adapter.json``'s ``base``, opened as any source
        and checked against the fingerprint recorded when the adapters were trained), with the
        adapters merged in."""
        meta = read_adapter_meta(self.path)
        try:
            base = open_source(meta["base"])
            state = base.checked_state_dict(meta.get("base_weights"))
        except CheckpointError as e:
            raise CheckpointError(f"{self.path} is a LoRA checkpoint whose base model cannot be read: {e}") from None
        model = Griffon(self.config)
        check_state_dict_shapes(model.state_dict(), {k: tuple(v.shape) for k, v in state.items()}, str(base.path))
        model.load_state_dict(state)
        apply_lora(model, meta["rank"], meta["alpha"], meta["dropout"], tuple(meta["targets"]))
        load_adapter(model, self.path)
        return merge_lora(model)


def open_source(path: str | Path) -> ModelSource:
    """The model ``path`` stands for (the module docstring lists the forms); :class:`CheckpointError`
    in one line if it is none of them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} is not a griffon checkpoint: {CONFIG_NAME} not found (nothing is there)")
    hf = _hf_config(path)
    if hf is not None:
        from griffon.checkpoint.convert import config_from_hf
        from griffon.checkpoint.llama import config_from_llama, is_llama

        try:
            config = config_from_llama(hf) if is_llama(hf) else config_from_hf(hf)
        except (CheckpointError, ConfigError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        if not list(path.glob("*.safetensors")):
            raise CheckpointError(f"{path}: an HF directory without *.safetensors weights")
        has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
        return ModelSource(path, config, "hf", load_tokenizer(path) if has_tokenizer else None)
    ckpt, tokenizer = resolve(path)
    return ModelSource(ckpt, load_config(ckpt), "lora" if is_adapter(ckpt) else "checkpoint", tokenizer)


def from_pretrained(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Griffon:
    """Load the model ``path`` stands for (:func:`open_source`): a checkpoint saved by
    :func:`~griffon.checkpoint.format.save_pretrained` or written by ``griffon convert``, a run,
    a LoRA run's checkpoint (its adapters merged into its base model) or an HF directory."""
    return open_source(path).model(device, dtype)


def checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights ``path`` stands for, by griffon's names (:meth:`ModelSource.state_dict`)."""
    return open_source(path).state_dict()


def load_for_inference(
    path: str | Path, device: str | torch.device = "auto", dtype: torch.dtype | None = None
) -> tuple[Griffon, Tokenizer]:
    """The model and tokenizer ``path`` stands for (:func:`open_source`), ready to read text: on
    ``device`` (:func:`~griffon.checkpoint.format.inference_device`), in ``dtype`` if given, in
    eval mode, with a tokenizer whose ids the model's vocabulary covers. Every command that reads
    with a model opens it here. Raises :class:`CheckpointError` for a missing or mismatched tokenizer."""
    source = open_source_with_tokenizer(path)
    model = source.model(device=inference_device(device), dtype=dtype).eval()
    if source.tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{source.path}: the tokenizer has {source.tokenizer.vocab_size} tokens, the model's vocabulary only "
            f"{model.config.vocab_size}"
        )
    return model, source.tokenizer


def open_source_with_tokenizer(path: str | Path) -> ModelSource:
    """:func:`open_source`, for commands that need the tokenizer: :class:`CheckpointError` if there is none."""
    source = open_source(path)
    if source.tokenizer is None:
        where = source.path if source.kind == "hf" else " or ".join(str(d) for d in tokenizer_dirs(source.path))
        raise CheckpointError(f"no tokenizer.json or tokenizer.model found in {where}")
    return source


def fingerprint(source: ModelSource) -> list[dict[str, Any]]:
    """SRC's weight files as they are now: name, size, modification time and SHA-256 of each."""
    out = []
    for f in source.weight_files():
        stat = f.stat()
        out.append(
            {"file": f.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256(f, "a weights file")}
        )
    return out


def check_fingerprint(source: ModelSource, recorded: list[dict[str, Any]]) -> None:
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
        if stat.st_size != entry["size"] or sha256(f, "a weights file") != entry["sha256"]:
            raise CheckpointError(
                f"the base model {source.path} has changed since the adapters were trained on it "
                f"({entry['file']} differs); restore it, or use the merged model exported before"
            )


def _hf_config(path: Path) -> dict | None:
    """The ``config.json`` of an HF directory (it names a ``model_type``), else None."""
    try:
        d = read_json(path / "config.json", CONFIG_BYTES, "an HF config.json")
    except FileError:
        return None
    return d if isinstance(d, dict) and "model_type" in d else None
