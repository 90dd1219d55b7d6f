"""The checkpoint format: a directory with ``config.json`` and ``model.safetensors``, written
atomically, and the tokenizer beside it (or beside its run)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from griffon.atomic import atomic_write
from griffon.config import ConfigError, ModelConfig
from griffon.data.tokenizers import Tokenizer, load_tokenizer
from griffon.model import Griffon
from griffon.run import CheckpointError, Run

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# A LoRA run's checkpoints hold adapters instead of the weights (griffon.checkpoint.adapters).
ADAPTER_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "adapter.json"


def save_state_dict(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage; tied weights are stored once anyway.
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_pretrained(model: Griffon, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed; other
    files in it are kept). Each file is replaced atomically: a crash leaves the old or the new one."""
    directory = Path(directory)
    save_state_dict(model.state_dict(), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(model.config.to_json()))
    return directory


def write_model(model: Griffon, directory: Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` as they are (for a
    directory that :func:`~griffon.atomic.atomic_directory` renames into place when complete)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(model.config.to_json())


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a griffon checkpoint: {CONFIG_NAME} not found")
    try:
        return ModelConfig.from_json(path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (corrupted or truncated file?)") from None


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a safetensors file, read from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (corrupted or truncated file?)") from None


def check_matches(
    directory: str | Path, saved: ModelConfig, shapes: dict[str, tuple[int, ...]], config: ModelConfig
) -> None:
    """Before a model of ``config`` is built: the checkpoint in ``directory``, whose config is
    ``saved`` (:func:`load_config`) and whose tensors have ``shapes`` (:func:`tensor_shapes`, read
    from the header, nothing loaded), was made with this model config and holds exactly that
    model's tensors. Raises :class:`CheckpointError` naming the first difference."""
    saved, wanted = saved.to_dict(), config.to_dict()
    if saved != wanted:
        key = next(k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k))
        raise CheckpointError(
            f"checkpoint {directory} was made with model.{key}={saved.get(key)!r}, this run's config.json "
            f"says {wanted.get(key)!r}"
        )
    with torch.device("meta"):
        expected = Griffon(config).state_dict()
    check_state_dict_shapes(expected, shapes, str(Path(directory) / WEIGHTS_NAME))


def check_state_dict_shapes(expected: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected or mis-shaped tensor."""
    for name, ref in expected.items():
        if name not in shapes:
            raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {tuple(ref.shape)})")
        if tuple(shapes[name]) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(shapes[name])}, the config expects {tuple(ref.shape)}"
            )
    for name in shapes:
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (checkpoint from another config?)")


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected or mis-shaped tensor."""
    check_state_dict_shapes(model.state_dict(), {k: tuple(v.shape) for k, v in state.items()}, source)


def check_fits(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """:func:`check_state_dict` against a model of ``cfg`` built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Griffon(cfg)
    check_state_dict(model, state, source)


def is_adapter(directory: str | Path) -> bool:
    """Whether ``directory`` is a LoRA run's checkpoint (adapters, no weights of its own)."""
    return (Path(directory) / ADAPTER_CONFIG_NAME).is_file() and not (Path(directory) / WEIGHTS_NAME).is_file()


def resolve(path: str | Path) -> tuple[Path, Tokenizer | None]:
    """The checkpoint a path stands for, and the tokenizer that goes with it (None if there is none;
    :func:`resolve_with_tokenizer` where one is needed).

    ``path`` is a checkpoint directory (``save_pretrained``, ``griffon convert``, a run's
    ``checkpoints/step_*``) or a training run (its newest checkpoint). The tokenizer is the
    ``tokenizer.json``/``tokenizer.model`` where griffon writes one: in the checkpoint, or, for a
    run's checkpoint, in the run (:func:`tokenizer_dirs`); never in a directory further up.
    """
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file() or is_adapter(path):
        ckpt = path
    else:
        newest = Run(path).newest_checkpoint()
        if newest is None:
            raise CheckpointError(f"{path} is neither a checkpoint ({WEIGHTS_NAME}) nor a run with checkpoints")
        ckpt = newest
    for d in tokenizer_dirs(ckpt):
        if (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file():
            return ckpt, load_tokenizer(d)
    return ckpt, None


def tokenizer_dirs(ckpt: Path) -> list[Path]:
    """Where a checkpoint's tokenizer may be: the checkpoint, and the run of a run's checkpoint
    (``RUN/checkpoints/step_N``), each as given and with links resolved (a link to a run's
    checkpoint finds the run's tokenizer)."""
    dirs: list[Path] = []
    for c in (ckpt, ckpt.resolve()):
        run = Run.of_checkpoint(c)
        for d in (c, run.root) if run is not None else (c,):
            if d not in dirs:
                dirs.append(d)
    return dirs


def inference_device(name: str | torch.device) -> torch.device:
    """``auto``: CUDA where there is a GPU, else the CPU; a CUDA device where there is none falls
    back to the CPU (lm-eval asks for ``cuda`` by default); any other name as it is."""
    device = torch.device(name) if name != "auto" else None
    if device is None or (device.type == "cuda" and not torch.cuda.is_available()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device
