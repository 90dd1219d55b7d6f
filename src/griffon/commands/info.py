"""``griffon info``: parameter counts and decode-state size of a preset, config or checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from griffon.config import ModelConfig, apply_overrides
from griffon.presets import get_preset


def resolve_config(name_or_path: str) -> ModelConfig:
    """A preset name, a JSON config file, a checkpoint directory or a run (its newest checkpoint's config)."""
    path = Path(name_or_path)
    if path.is_dir():
        from griffon.checkpoint import open_source

        return open_source(path).config
    if path.suffix == ".json" or path.exists():
        return ModelConfig.from_json(path)
    return get_preset(name_or_path)


def run(args: argparse.Namespace) -> None:
    from griffon.accounting import (
        active_params,
        decode_state_bytes,
        ffn_params,
        forward_flops_per_token,
        param_counts,
        structuredffn_counts,
        train_flops_per_token,
    )

    cfg = resolve_config(args.model)
    if args.seq_len is None:
        args.seq_len = cfg.max_seq_len or 8192
    if args.set:
        cfg = ModelConfig.from_dict(apply_overrides(cfg.to_dict(), args.set))
    params, non_embedding = param_counts(cfg)
    # bf16 weights and caches, as served; the RG-LRU state is float32 regardless.
    state_bytes = decode_state_bytes(cfg, args.seq_len)
    info = {
        "params": params,
        "params_non_embedding": non_embedding,
        "active_params": active_params(cfg),
        "ffn_params": ffn_params(cfg),
        "train_flops_per_token": train_flops_per_token(cfg, args.seq_len),
        "forward_flops_per_token": forward_flops_per_token(cfg, args.seq_len),
        "flops_seq_len": args.seq_len,
        "layers": cfg.block_types,
        "decode_state_bytes_per_sequence": state_bytes,
        "config": cfg.to_dict(),
    }
    if args.tokens is not None:
        info["train_flops"] = info["train_flops_per_token"] * args.tokens
    if args.convention == "structuredffn":
        info["structuredffn"] = structuredffn_counts(cfg, args.seq_len, args.tokens)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"params                  {info['params']:,}")
    print(f"params (non-embedding)  {info['params_non_embedding']:,}")
    if cfg.moe.enabled:
        m = cfg.moe
        print(f"active params / token   {info['active_params']:,} (top {m.top_k} of {m.num_experts} experts"
              f"{f', {m.shared_experts} shared' if m.shared_experts else ''}, router included)")  # fmt: skip
    print(f"FFN params              {info['ffn_params']:,}")
    print(f"train FLOPs / token     {info['train_flops_per_token']:.4g} at {args.seq_len} tokens per sequence")
    if args.tokens is not None:
        print(f"train FLOPs             {info['train_flops']:.4g} for {args.tokens:.4g} tokens")
    print(f"layers                  {' '.join(t[0].upper() for t in cfg.block_types)}")
    note = f"at {args.seq_len} tokens (grows with length)" if cfg.has_global_attention else "(fixed, any length)"
    print(f"decode state / sequence {state_bytes / 2**20:.2f} MiB bf16 {note}")
    if "structuredffn" in info:
        c = info["structuredffn"]
        line = f"StructuredFFN convention: params {c['params'] / 1e6:.1f}M, FFN {c['ffn_params'] / 1e6:.1f}M"
        if "active_params" in c:
            line += f", active {c['active_params'] / 1e6:.1f}M"
        if "train_flops" in c:
            line += f", train FLOPs {c['train_flops']:.4g} ({c['steps']} steps of 524288 tokens)"
        print(line)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon info`` to the command line."""
    s = sub.add_parser("info", help="parameter counts and decode-state size of a preset, config or checkpoint")
    s.add_argument("model", help="preset name, config JSON or checkpoint directory")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length for FLOPs and global attention's decode state (default: max_seq_len, else 8192)",
    )
    s.add_argument("--tokens", type=float, default=None, help="also give the training FLOPs for this many tokens")
    s.add_argument(
        "--convention",
        choices=["griffon", "structuredffn"],
        default="griffon",
        help="structuredffn: also count as the StructuredFFN papers do (Table 1 of arXiv 2406.16450)",
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model field, e.g. --set ffn_structure.kind=lowrank --set ffn_structure.rank=512",
    )
    s.set_defaults(fn=run)
