"""``griffon convert``: an HF directory (RecurrentGemma, Llama-family), a GGUF file or a DeepMind
state dict -> griffon checkpoint."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    from griffon.checkpoint.convert import convert

    cfg = convert(args.src, args.dst, config_file=args.config, preset=args.preset)
    print(f"wrote {args.dst} ({cfg.num_layers} layers, width {cfg.width}, vocab {cfg.vocab_size})")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon convert`` to the command line."""
    s = sub.add_parser(
        "convert", help="HF RecurrentGemma or Llama-family dir, GGUF file or DeepMind state dict -> griffon checkpoint"
    )
    s.add_argument("src", help="HF directory (config.json + *.safetensors), a Llama-family .gguf (needs the gguf "
                               "package) or DeepMind .pt/.safetensors")  # fmt: skip
    s.add_argument("dst", help="output directory (must not exist or be empty)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--config", help="DeepMind GriffinConfig fields as JSON (DeepMind sources)")
    g.add_argument("--preset", help="recurrentgemma-2b or recurrentgemma-9b (DeepMind sources)")
    s.set_defaults(fn=run)
