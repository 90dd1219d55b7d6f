"""Loaders of the offline tasks' JSONL files (lm-eval's ``custom_dataset``), read beside this file."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> dict[str, datasets.Dataset]:
    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}


def next_line(**kwargs) -> dict[str, datasets.Dataset]:
    return _load("next_line")


def last_word(**kwargs) -> dict[str, datasets.Dataset]:
    return _load("last_word")


def next_line_long(**kwargs) -> dict[str, datasets.Dataset]:
    return _load("next_line_long")
