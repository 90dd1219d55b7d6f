"""``griffon tokenizer``: tokenizers."""

from __future__ import annotations

import argparse


def run_train(args: argparse.Namespace) -> None:
    from griffon.data.sources import iter_documents
    from griffon.data.tokenizers import train_bpe

    texts = (doc for p in args.inputs for doc in iter_documents(p, args.field))
    tok = train_bpe(texts, args.vocab_size, args.out)
    print(f"wrote {args.out} ({tok.vocab_size} tokens)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon tokenizer`` to the command line."""
    s = sub.add_parser("tokenizer", help="tokenizers")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer with HF tokenizers")
    t.add_argument("inputs", nargs="+")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--out", required=True, help="output tokenizer.json")
    t.add_argument("--field", default="text")
    t.set_defaults(fn=run_train)
