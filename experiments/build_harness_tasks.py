"""Build the offline lm-evaluation-harness tasks shipped in ``src/griffon/eval/harness_tasks/``.

    python experiments/build_harness_tasks.py

From the works the embedded corpus holds out for validation (the same seeded choice as
``griffon data prepare``'s default split, so no model trained on the corpus saw them):

* ``griffon_next_line``: multiple choice, which of four lines follows three lines of a play (the
  other three from the same work);
* ``griffon_next_line_long``: the same question after a passage of twenty lines, where a model
  that uses its context has more to go on (and sharing the context among the choices saves more);
* ``griffon_last_word``: the last word of a line given the line and the two before it
  (LAMBADA-style: accuracy of greedy prediction and perplexity).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from griffon.data.corpus import default_corpus
from griffon.data.sources import iter_documents

OUT = Path(__file__).resolve().parent.parent / "src" / "griffon" / "eval" / "harness_tasks"
EXAMPLES = 200
LONG_CONTEXT_LINES = 20


def held_out_works(val_fraction: float = 0.1, seed: int = 0) -> list[str]:
    docs = list(iter_documents(default_corpus()))
    n_val = max(1, round(val_fraction * len(docs)))
    return [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))[:n_val]]


def next_line_questions(rng: random.Random, works: list[list[str]], context_lines: int) -> list[dict]:
    """Which of four lines of the same work follows ``context_lines`` lines."""
    questions = []
    while len(questions) < EXAMPLES:
        lines = rng.choice(works)
        i = rng.randrange(context_lines, len(lines))
        others = rng.sample([line for j, line in enumerate(lines) if j != i], 3)
        choices = [lines[i], *others]
        rng.shuffle(choices)
        context = "\n".join(lines[i - context_lines : i])
        questions.append({"context": context, "choices": choices, "label": choices.index(lines[i])})
    return questions


def main() -> None:
    rng = random.Random(0)
    works = [[line.strip() for line in text.splitlines() if len(line.strip()) >= 20] for text in held_out_works()]
    next_line = next_line_questions(rng, works, 3)
    last_word = []
    while len(last_word) < EXAMPLES:
        lines = rng.choice(works)
        i = rng.randrange(2, len(lines))
        words = lines[i].rstrip(".,;:!?'\"-").split(" ")
        if len(words) < 5 or not words[-1].isalpha():
            continue
        context = "\n".join([*lines[i - 2 : i], " ".join(words[:-1])])
        last_word.append({"context": context, "target": " " + words[-1]})
    # its own random stream, so that the two tasks above stay as they were first built
    next_line_long = next_line_questions(random.Random(1), works, LONG_CONTEXT_LINES)
    for name, rows in (("next_line", next_line), ("last_word", last_word), ("next_line_long", next_line_long)):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {OUT / name}.jsonl ({len(rows)} examples)")


if __name__ == "__main__":
    main()
