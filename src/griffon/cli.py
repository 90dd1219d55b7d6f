"""The ``griffon`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from griffon.config import ModelConfig
from griffon.presets import get_preset, preset_names


def resolve_config(name_or_path: str) -> ModelConfig:
    """A preset name, a JSON config file, or a checkpoint directory holding config.json."""
    path = Path(name_or_path)
    if path.is_dir():
        from griffon.checkpoint import load_config

        return load_config(path)
    if path.suffix == ".json" or path.is_file():
        return ModelConfig.from_json(path)
    return get_preset(name_or_path)


def cmd_info(args: argparse.Namespace) -> None:
    from griffon.accounting import decode_state_bytes
    from griffon.model import Griffon

    cfg = resolve_config(args.model)
    with torch.device("meta"):
        model = Griffon(cfg)
    # bf16 weights and caches, as served; the RG-LRU state is float32 regardless.
    state_bytes = decode_state_bytes(cfg, args.seq_len)
    info = {
        "params": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "layers": cfg.block_types,
        "decode_state_bytes_per_sequence": state_bytes,
        "decode_state_seq_len": args.seq_len,
        "config": cfg.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"params                  {info['params']:,}")
    print(f"params (non-embedding)  {info['params_non_embedding']:,}")
    print(f"layers                  {' '.join(t[0].upper() for t in cfg.block_types)}")
    grows = cfg.attention_window is None and "attention" in cfg.block_types
    note = f"at {args.seq_len} tokens (grows with length)" if grows else "(fixed, any length)"
    print(f"decode state / sequence {state_bytes / 2**20:.2f} MiB bf16 {note}")


def cmd_presets(args: argparse.Namespace) -> None:
    for name in preset_names():
        print(name)


def cmd_convert(args: argparse.Namespace) -> None:
    from griffon.convert import convert

    cfg = convert(args.src, args.dst, config_file=args.config, preset=args.preset)
    print(f"wrote {args.dst} ({cfg.num_layers} layers, width {cfg.width}, vocab {cfg.vocab_size})")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from griffon.convert import export_hf

    export_hf(args.src, args.dst)
    print(f"wrote HF RecurrentGemma checkpoint to {args.dst}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="griffon", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameter counts and decode-state size of a preset, config or checkpoint")
    s.add_argument("model", help="preset name, config JSON or checkpoint directory")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--seq-len", type=int, default=8192, help="length for the decode-state size of global attention")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("presets", help="list preset names")
    s.set_defaults(fn=cmd_presets)

    s = sub.add_parser("convert", help="HF RecurrentGemma dir or DeepMind state dict -> griffon checkpoint")
    s.add_argument("src", help="HF directory (config.json + *.safetensors) or DeepMind .pt/.safetensors")
    s.add_argument("dst", help="output directory (must not exist or be empty)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--config", help="DeepMind GriffinConfig fields as JSON (DeepMind sources)")
    g.add_argument("--preset", help="recurrentgemma-2b or recurrentgemma-9b (DeepMind sources)")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("export-hf", help="griffon checkpoint -> HF RecurrentGemma directory")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(fn=cmd_export_hf)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # our errors subclass ValueError and carry the full story
        print(f"griffon {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
