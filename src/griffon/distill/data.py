"""Text sampled from the teacher, for distilling when no corpus fits: each prompt of a file, as a
user's turn rendered with the teacher's chat template, continued ``samples`` times by the teacher
(the serving engine, each completion seeded), written as a corpus ``griffon train`` and
``griffon distill`` read (``{"text": rendered prompt + completion}`` a line).

Sampling goes through :func:`griffon.align.rewards.sample_rewards` without a reward: resumable
(a cut run continues at the first prompt without all its completions) and seeded the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from griffon.align.chat import saved_template, template_for
from griffon.align.examples import read_objects
from griffon.align.rewards import read_prompts, sample_rewards
from griffon.atomic import atomic_write
from griffon.checkpoint import load_for_inference


def teacher_corpus(
    teacher: str | Path,
    prompts_file: str | Path,
    out: str | Path,
    samples: int = 4,
    max_tokens: int = 256,
    temperature: float = 1.0,
    seed: int = 0,
) -> int:
    """Write ``out`` (JSONL, ``text`` a line): the teacher's ``samples`` completions of each prompt
    of ``prompts_file`` (``{"prompt": ...}`` lines), after its chat template's rendering of the
    prompt as a user's turn. The completions are kept in ``OUT.samples.jsonl`` as they come.
    Returns the number of documents written."""
    out = Path(out)
    model, tokenizer = load_for_inference(teacher)
    template = (saved_template(tokenizer.directory) if tokenizer.directory else None) or template_for(tokenizer)
    prompts, wheres = read_prompts(prompts_file)
    rendered = [template.render([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    raw = out.with_name(out.name + ".samples.jsonl")
    sample_rewards(model, tokenizer, rendered, None, samples, raw, max_tokens=max_tokens, temperature=temperature,
                   seed=seed, wheres=wheres)  # fmt: skip
    lines = [json.dumps({"text": row["prompt"] + row["completion"]}) + "\n" for _, row in read_objects(raw)]
    atomic_write(out, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"))
    return len(lines)
