"""The embedded default corpus: 42 public-domain works of Shakespeare (one JSON object per work)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def default_corpus() -> Path:
    """Path of the packaged ``shakespeare.jsonl.gz`` (fields ``title`` and ``text``)."""
    return Path(str(resources.files("griffon.data") / "shakespeare.jsonl.gz"))
