"""``model=auto`` against ``xz -9e`` and zlib on text corpora found on a stock Linux machine.

    python experiments/auto_corpora.py --out runs/auto_corpora --json docs/results/auto_corpora.json

For each corpus: build it (``OUT/corpora/NAME.jsonl.gz``, one JSON object per document with a
``text`` field, at most ``--max-mb`` MB of UTF-8 text, files taken in sorted path order so the same
machine gives the same corpus); train ``griffon train --set data.path=CORPUS`` (``model=auto``,
the default 8-minute budget) into ``OUT/NAME``; score the held-out documents whole with ``griffon
eval``; compress the same documents, concatenated, with ``xz -9e`` (``lzma`` preset 9 | EXTREME)
and zlib level 9. The model's bits per byte here count every byte of the held-out documents: the
first token of each document, which the model does not predict, is charged log2(vocabulary) bits.
A finished corpus (its ``eval.json`` present) is not run again.

    gnu-manuals    prose    GNU info manuals (/usr/share/info), one document per info node
    python-stdlib  code     the Python standard library's modules (/usr/lib/python3.*), tests left out
    changelogs     logs     Debian package changelogs (/usr/share/doc/*/changelog.Debian.gz)
    html-docs      markup   HTML documentation (/usr/share/doc/**/*.html)
    man-pages      markup   troff sources of the English manual pages (/usr/share/man/man*/)

Files that are not UTF-8 are skipped. Results: ``docs/auto.md``.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import lzma
import math
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from griffon.atomic import atomic_write_json
from griffon.data.prepare import validation_ids


def _read(path: str) -> str | None:
    try:
        data = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def _files(pattern: str, exclude: tuple[str, ...] = ()) -> Iterator[str]:
    for path in sorted(glob.glob(pattern, recursive=True)):
        if Path(path).is_file() and not any(x in path for x in exclude):
            yield path


def gnu_manuals() -> Iterator[str]:
    for path in _files("/usr/share/info/*.info*.gz"):
        text = _read(path)
        if text:
            # Info files separate their nodes with the unit separator (0x1f).
            yield from (node.strip("\n") for node in text.split("\x1f") if node.strip())


def python_stdlib() -> Iterator[str]:
    for path in _files("/usr/lib/python3.*/**/*.py", exclude=("/test", "/site-packages/", "/dist-packages/")):
        text = _read(path)
        if text and text.strip():
            yield text


def changelogs() -> Iterator[str]:
    for path in _files("/usr/share/doc/*/changelog.Debian.gz"):
        text = _read(path)
        if text:
            yield text


def html_docs() -> Iterator[str]:
    for path in _files("/usr/share/doc/**/*.html"):
        text = _read(path)
        if text and text.strip():
            yield text


def man_pages() -> Iterator[str]:
    for path in _files("/usr/share/man/man[0-9]/*.gz"):
        text = _read(path)
        # Pages that only include another (".so man1/x.1") carry no text of their own.
        if text and not text.startswith(".so "):
            yield text


CORPORA = {
    "gnu-manuals": ("prose", gnu_manuals),
    "python-stdlib": ("code", python_stdlib),
    "changelogs": ("logs", changelogs),
    "html-docs": ("markup", html_docs),
    "man-pages": ("markup", man_pages),
}


def build(name: str, out: Path, max_bytes: int) -> dict:
    kind, documents = CORPORA[name]
    n_docs = n_bytes = 0
    path = out / f"{name}.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for text in documents():
            size = len(text.encode("utf-8"))
            if n_bytes + size > max_bytes:
                if n_bytes:
                    break
                continue
            f.write(json.dumps({"text": text}) + "\n")
            n_docs += 1
            n_bytes += size
    return {"corpus": name, "kind": kind, "documents": n_docs, "bytes": n_bytes, "path": str(path)}


def compressors(corpus: Path, val_fraction: float = 0.1) -> dict:
    """Bits per byte of ``xz -9e`` and zlib -9 on the held-out documents (the split griffon makes)."""
    docs = [json.loads(line)["text"] for line in gzip.open(corpus, "rt", encoding="utf-8")]
    held = validation_ids(len(docs), val_fraction, seed=0)
    data = b"".join(d.encode("utf-8") for i, d in enumerate(docs) if i in held)
    bits = {
        "xz_9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) * 8,
        "zlib_9": len(zlib.compress(data, 9)) * 8,
    }
    return {"held_out_docs": len(held), "held_out_bytes": len(data)} | {k: v / len(data) for k, v in bits.items()}


def run_corpus(name: str, corpus: Path, out: Path, minutes: float | None) -> dict:
    run = out / name
    griffon = [sys.executable, "-m", "griffon.cli"]
    if not (run / "auto.json").is_file():
        extra = ["--set", f"max_minutes={minutes}"] if minutes else []
        t0 = time.time()
        subprocess.run([*griffon, "train", "--set", f"data.path={corpus}", *extra, "--out", str(run)], check=True)
        atomic_write_json(run / "wall.json", {"train_wall_s": time.time() - t0})
    if not (run / "eval.json").is_file():
        subprocess.run([*griffon, "eval", str(run), "--data", str(run / "data"), "--json", str(run / "eval.json")],
                       check=True)  # fmt: skip
    plan = json.loads((run / "auto.json").read_text())
    scores = json.loads((run / "eval.json").read_text())
    chosen = plan["chosen"]
    nats = scores["loss"] * scores["tokens"]
    first_tokens = scores["documents"] * math.log2(chosen["vocab_size"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    final = [r for r in log if r.get("kind") == "final_eval"]
    return {
        "tokenizer": chosen["tokenizer"],
        "width": chosen["width"],
        "params": chosen["params"],
        "bytes_per_token": chosen["bytes_per_token"],
        "planned_steps": chosen["steps"],
        "steps": final[-1]["step"] if final else None,
        "planning_s": plan["planning_s"],
        "train_wall_s": json.loads((run / "wall.json").read_text())["train_wall_s"],
        "scored_bytes": scores["bytes"],
        "model_nats": nats,
        "first_token_bits": first_tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--max-mb", type=float, default=5.0, help="cap on each corpus's UTF-8 text, in MB")
    p.add_argument("--only", nargs="*", choices=sorted(CORPORA), help="these corpora only")
    p.add_argument("--minutes", type=float, default=None, help="time budget per run (default: griffon's, 8)")
    p.add_argument("--build-only", action="store_true", help="build the corpora and stop")
    p.add_argument("--json", type=Path, help="write the table here")
    args = p.parse_args()
    (args.out / "corpora").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or CORPORA:
        corpus = args.out / "corpora" / f"{name}.jsonl.gz"
        built = build(name, args.out / "corpora", int(args.max_mb * 1e6)) if not corpus.is_file() else None
        if args.build_only:
            print(json.dumps(built))
            continue
        docs = sum(1 for _ in gzip.open(corpus, "rt", encoding="utf-8"))
        row = {"corpus": name, "kind": CORPORA[name][0], "documents": docs} | compressors(corpus)
        row |= run_corpus(name, corpus, args.out, args.minutes)
        row["model_bpb"] = (row.pop("model_nats") / math.log(2) + row.pop("first_token_bits")) / row["held_out_bytes"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if rows:
        print("| corpus | kind | docs | held-out bytes | recipe | steps | griffon | xz -9e | zlib -9 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            recipe = f"{r['tokenizer']}, width {r['width']}, {r['params'] / 1e6:.2f}M params"
            print(f"| {r['corpus']} | {r['kind']} | {r['documents']} | {r['held_out_bytes']:,} | {recipe} | {r['steps']} "
                  f"| **{r['model_bpb']:.3f}** | {r['xz_9e']:.3f} | {r['zlib_9']:.3f} |")  # fmt: skip
    if args.json:
        atomic_write_json(args.json, {"rows": rows, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
