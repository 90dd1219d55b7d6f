"""A Griffin or Hawk student made from a pretrained transformer (the teacher), layer for layer.

Layer ``i`` of the student is layer ``i`` of the teacher with, where the student's block pattern
says ``recurrent``, the attention replaced by an RG-LRU recurrent block. Everything whose shape
the student shares is copied: the embeddings and the head, every norm, every MLP, and the
attention layers the student keeps (with its own window). A new recurrent block starts
(``init="attention"``) from the attention layer it replaces, as Mamba-in-the-Llama (Wang et al.
2024, arXiv 2408.15237) starts its Mamba layers from the attention weights:

* the recurrent branch's input projection ``linear_x`` is the value projection ``W_V``, its rows
  repeated across each key/value head's query heads (GQA), so the branch carries the values;
* the output projection ``linear_out`` is ``W_O``;
* the gate branch ``linear_y`` has zero weights and the bias at which the tanh-approximated GeLU
  is 1, so the block starts as ``W_O RG-LRU(conv(W_V x))``, a decaying average of the values;
* the convolution is the identity (its tap on the current token 1, the others 0);
* the RG-LRU keeps its own initialisation (its gates and decay).

This needs ``lru_width == num_heads * head_dim``; ``init="random"`` keeps the block's own random
initialisation for any width.
"""

from __future__ import annotations

import torch

from griffon.checkpoint.format import CheckpointError
from griffon.config import ModelConfig
from griffon.model import Griffon

INITS = ("attention", "random")
GELU_ONE = 1.1446303
"""The x at which the tanh-approximated GeLU is 1 (to 7 digits)."""
STUDENTS = {"griffin": ("recurrent", "recurrent", "attention"), "hawk": ("recurrent",)}
"""Block patterns a student may be named by."""


class DistillError(CheckpointError):
    """The teacher cannot make this student; the message names the tensor or setting."""


def student_config(teacher: ModelConfig, pattern: tuple[str, ...], window: int | None) -> ModelConfig:
    """The teacher's config with ``pattern`` for its layers, the kept attention layers local with
    ``window`` (None: as the teacher's), and recurrent branches as wide as the attention's heads."""
    if teacher.block_pattern != ("attention",):
        raise DistillError(
            f"the teacher must be a transformer (block_pattern ['attention']), not {teacher.block_pattern}"
        )
    return teacher.replace(
        block_pattern=tuple(pattern),
        attention_window=window if window is not None else teacher.attention_window,
        window_semantics="hf" if window is not None else teacher.window_semantics,
        max_seq_len=None if window is not None else teacher.max_seq_len,
        lru_width=teacher.num_heads * teacher.resolved_head_dim,
        lru_num_blocks=teacher.num_heads,
        extra={},
    )


def copied_names(student: ModelConfig) -> list[str]:
    """The student's tensors copied from the teacher (the rest are new: the recurrent blocks)."""
    with torch.device("meta"):
        names = list(Griffon(student).state_dict())
    kept = {i for i, t in enumerate(student.block_types) if t == "attention"}
    out = []
    for name in names:
        parts = name.split(".")
        if parts[0] == "blocks" and parts[2] == "temporal" and int(parts[1]) not in kept:
            continue
        out.append(name)
    return out


def check_student(teacher_shapes: dict[str, tuple[int, ...]], teacher: ModelConfig, student: ModelConfig,
                  init: str) -> None:  # fmt: skip
    """Refuse, naming the tensor and both shapes, a student that cannot take the teacher's weights."""
    if student.num_layers != teacher.num_layers:
        raise DistillError(f"the student has {student.num_layers} layers, the teacher {teacher.num_layers}")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Griffon(student).state_dict().items()}
    for name in copied_names(student):
        if name not in teacher_shapes:
            raise DistillError(f"the teacher has no tensor {name!r} for the student")
        if teacher_shapes[name] != shapes[name]:
            raise DistillError(
                f"tensor {name!r} is {teacher_shapes[name]} in the teacher, {shapes[name]} in the student"
            )
    if init == "attention" and "recurrent" in student.block_pattern:
        q_dim = teacher.num_heads * teacher.resolved_head_dim
        if student.resolved_lru_width != q_dim:
            raise DistillError(
                f"distill.init=attention needs lru_width == num_heads * head_dim = {q_dim}, the student has "
                f"{student.resolved_lru_width}; set model.lru_width={q_dim} or distill.init=random"
            )


@torch.no_grad()
def init_student(student: Griffon, teacher: Griffon, init: str) -> None:
    """Copy the teacher's shared tensors into ``student`` (bitwise) and start its new recurrent
    blocks as ``init`` says (the module docstring)."""
    cfg, teacher_state = student.config, teacher.state_dict()
    check_student({k: tuple(v.shape) for k, v in teacher_state.items()}, teacher.config, cfg, init)
    own = student.state_dict()
    for name in copied_names(cfg):
        own[name].copy_(teacher_state[name])
    if init == "random":
        return
    group = cfg.num_heads // cfg.num_kv_heads
    hd = cfg.resolved_head_dim
    for i, kind in enumerate(cfg.block_types):
        if kind != "recurrent":
            continue
        attn, block = teacher.blocks[i].temporal, student.blocks[i].temporal
        v = attn.v.weight.unflatten(0, (cfg.num_kv_heads, hd))  # (H_kv, hd, D)
        block.linear_x.weight.copy_(v.repeat_interleave(group, dim=0).flatten(0, 1))  # (H hd, D)
        block.linear_x.bias.zero_()
        block.linear_out.weight.copy_(attn.o.weight)
        block.linear_out.bias.copy_(attn.o.bias if attn.o.bias is not None else torch.zeros_like(block.linear_out.bias))
        block.linear_y.weight.zero_()
        block.linear_y.bias.fill_(GELU_ONE)
        block.conv.weight.zero_()
        block.conv.weight[-1] = 1.0  # w[K-1] multiplies the current input
        block.conv.bias.zero_()
