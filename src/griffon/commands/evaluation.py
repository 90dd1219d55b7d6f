"""``griffon eval``: loss, perplexity and bits per byte of whole documents."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from griffon.atomic import atomic_write


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def run(args: argparse.Namespace) -> None:
    from griffon.checkpoint import load_for_inference, open_source
    from griffon.eval.documents import eval_documents
    from griffon.eval.score import byte_table, plot_by_position, score_documents

    results = {}
    for name in args.models:
        model, tokenizer = load_for_inference(name, device=args.device)
        ckpt = open_source(name).path
        docs = eval_documents(tokenizer, args.data, args.split, [*args.text, *args.jsonl], args.field)
        scores = score_documents(
            model, docs, byte_table(tokenizer), args.seq_len, args.batch_size, args.stride,
            per_doc=args.per_doc, by_position=args.by_position or bool(args.png), max_len=args.max_len,
            progress=sys.stderr.isatty(),
        )  # fmt: skip
        if scores.tokens == 0:
            raise ValueError("nothing to score: every document holds fewer than 2 tokens")
        s = scores.summary()
        how = "sliding window" if model.config.has_global_attention else "whole documents, state carried"
        print(f"{name}: loss {s['loss']:.4f} nats/token, perplexity {s['perplexity']:.3f}, "
              f"{s['bits_per_byte']:.4f} bits/byte on {s['tokens']:,} tokens of {s['documents']} documents ({how})")  # fmt: skip
        results[name] = scores.to_dict() | {"checkpoint": str(ckpt), "seq_len": args.seq_len}
    if args.json:
        text = json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=2)
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(text))
    if args.png:
        plot_by_position(results, args.png, args.train_len)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon eval`` to the command line."""
    s = sub.add_parser("eval", help="loss, perplexity and bits per byte of whole documents")
    s.add_argument("models", nargs="+", help="runs, checkpoints or exported models (several: compared)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--data", help="a prepared data directory (griffon data prepare)")
    src.add_argument("--text", nargs="+", default=[], metavar="FILE", help="text files, one document each")
    src.add_argument("--jsonl", nargs="+", default=[], metavar="FILE", help="JSONL files, one document per line")
    s.add_argument("--split", default="val", choices=["train", "val"], help="with --data: the split (default val)")
    s.add_argument("--field", default="text", help="JSONL field holding the text")
    s.add_argument("--seq-len", type=_positive, default=1024,
                   help="tokens per forward chunk (the cache carries across chunks); global attention: the window")  # fmt: skip
    s.add_argument("--stride", type=_positive, default=None, help="global attention: window stride (default seq-len/2)")
    s.add_argument("--batch-size", type=_positive, default=8, help="documents per batch")
    s.add_argument("--max-len", type=_positive, default=None, help="score only the first N tokens of each document")
    s.add_argument("--per-doc", action="store_true", help="also give each document's scores (in --json)")
    s.add_argument("--by-position", action="store_true", help="loss by token position (log-spaced buckets, in --json)")
    s.add_argument("--png", help="plot loss by position here (implies --by-position)")
    s.add_argument("--train-len", type=_positive, default=None, help="mark this training length in the plot")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", help="write the results here")
    s.set_defaults(fn=run)
