"""``griffon export-hf``: griffon checkpoint -> HF directory (Llama's layout for a Llama-family
model, else RecurrentGemma's)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    from griffon.align.chat import saved_template
    from griffon.checkpoint import open_source
    from griffon.checkpoint.convert import export_hf
    from griffon.checkpoint.llama import llama_problems

    source = open_source(args.src)
    tokenizer = source.tokenizer
    # The chat template the run was trained with goes with the export (apply_chat_template reads it).
    template = saved_template(tokenizer.directory) if tokenizer is not None and tokenizer.directory else None
    export_hf(source.config, source.state_dict(), args.dst, tokenizer, template.source if template else None)
    layout = "Llama" if not llama_problems(source.config) else "RecurrentGemma"
    print(f"wrote HF {layout} checkpoint to {args.dst}")
    if tokenizer is None:
        print(f"no tokenizer found for {args.src}: {args.dst} holds the model only")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon export-hf`` to the command line."""
    s = sub.add_parser("export-hf", help="griffon checkpoint -> HF directory (Llama or RecurrentGemma layout)")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(fn=run)
