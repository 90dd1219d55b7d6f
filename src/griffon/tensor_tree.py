"""Nested training state (an optimizer's ``state_dict``, say) as one safetensors file, never a pickle.

A pickle runs code when it is loaded, so a run directory received from someone else could
run anything on ``griffon train --resume``. Here the tensors of a tree of dicts, lists, tuples,
numbers, strings and ``None`` go into a safetensors file and the rest of the tree, as JSON,
into that file's metadata. Loading parses JSON and reads raw tensor bytes; it runs nothing.

Encoding of the JSON skeleton: a tensor is ``{"$tensor": "<key>"}``, a tuple ``{"$tuple": [...]}``,
a dict whose keys are not all plain strings (an optimizer's integer parameter ids) or that has a
key starting with ``$`` is ``{"$items": [[key, value], ...]}``; other dicts and lists are themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "griffon-tensor-tree-v1"
_SCALARS = (bool, int, float, str, type(None))


class TreeFileError(ValueError):
    """A tree file is missing, corrupted or not one this module wrote. The message names the file."""


def _encode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        key = str(len(tensors))
        # safetensors wants contiguous CPU tensors that share no storage with each other
        tensors[key] = node.detach().cpu().contiguous().clone()
        return {"$tensor": key}
    if isinstance(node, _SCALARS):
        return node
    if isinstance(node, tuple):
        return {"$tuple": [_encode(v, tensors) for v in node]}
    if isinstance(node, list):
        return [_encode(v, tensors) for v in node]
    if isinstance(node, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in node):
            return {k: _encode(v, tensors) for k, v in node.items()}
        if not all(isinstance(k, _SCALARS) for k in node):
            raise TypeError(f"cannot store a dict key of type {type(next(iter(node))).__name__}")
        return {"$items": [[k, _encode(v, tensors)] for k, v in node.items()]}
    raise TypeError(f"cannot store a value of type {type(node).__name__} (tensors, numbers, strings, lists, dicts)")


def _decode(node: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, path) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        (tag, value), *_ = node.items()
        if tag == "$tensor":
            if value not in tensors:
                raise TreeFileError(f"{path}: the structure names tensor {value!r}, which the file does not hold")
            return tensors[value]
        if tag == "$tuple":
            return tuple(_decode(v, tensors, path) for v in value)
        if tag == "$items":
            return {k: _decode(v, tensors, path) for k, v in value}
    if any(k.startswith("$") for k in node):
        raise TreeFileError(f"{path}: unknown entry {sorted(node)!r} in the structure")
    return {k: _decode(v, tensors, path) for k, v in node.items()}


def save_tree(tree: Any, path: str | Path) -> None:
    """Write ``tree`` to ``path`` (not atomically: write into a temporary directory and rename it)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode(tree, tensors))
    save_file(tensors, str(path), metadata={"format": FORMAT, "tree": skeleton})


def load_tree(path: str | Path) -> Any:
    """Read a tree written by :func:`save_tree` (tensors on the CPU)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise TreeFileError(f"{path} is not a griffon state file (format {metadata.get('format')!r})")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        skeleton = json.loads(metadata["tree"])
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as e:
        raise TreeFileError(f"cannot read {path}: {e} (corrupted or truncated file?)") from None
    try:
        return _decode(skeleton, tensors, path)
    except TreeFileError:
        raise
    except (TypeError, ValueError, AttributeError) as e:
        raise TreeFileError(f"{path}: malformed structure ({e})") from None
