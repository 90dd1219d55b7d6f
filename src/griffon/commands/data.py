"""``griffon data``: data preparation."""

from __future__ import annotations

import argparse


def run_prepare(args: argparse.Namespace) -> None:
    from griffon.data.prepare import prepare
    from griffon.data.tokenizers import load_tokenizer

    meta = prepare(args.inputs, load_tokenizer(args.tokenizer), args.out, args.val_fraction, args.seed, args.field)
    for split, m in meta["splits"].items():
        print(f"{split}: {m['documents']} documents, {m['tokens']:,} tokens, {m['bytes']:,} bytes")


def run_verify(args: argparse.Namespace) -> None:
    from griffon.data.prepare import verify

    meta = verify(args.directory)
    tokens = sum(m["tokens"] for m in meta["splits"].values())
    print(f"{args.directory}: {tokens:,} tokens, every shard matches the SHA-256 in meta.json")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon data`` to the command line."""
    s = sub.add_parser("data", help="data preparation")
    dsub = s.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="tokenize text/JSONL/parquet/HF-dataset inputs into token shards")
    d.add_argument("inputs", nargs="+")
    d.add_argument("--tokenizer", default="bytes", help="bytes, a tokenizer.json, or a sentencepiece .model")
    d.add_argument("--out", required=True)
    d.add_argument("--val-fraction", type=float, default=0.1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--field", default="text", help="JSONL/parquet/dataset column holding the text")
    d.set_defaults(fn=run_prepare)
    d = dsub.add_parser("verify", help="check a prepared directory's token shards against meta.json's SHA-256")
    d.add_argument("directory")
    d.set_defaults(fn=run_verify)
