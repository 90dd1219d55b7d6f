"""Reference data for offline alignment: ``griffon rewards PROMPTS --policy CKPT --reward module:function``.

For every prompt of a JSONL file (``{"prompt": ...}`` lines), ``n`` completions are sampled from
the reference policy (the model the alignment run will start from, as in QRPO's offline setting)
through the batched serving engine, each is scored by the reward (a Python callable
``reward(prompt, completion) -> float``, given the completion up to its stop string), and the QRPO
dataset is written: one line per completion, ``{"prompt", "completion", "reward", "ref_rewards"}``,
the completion as sampled (its stop string too: the tokens whose log-probability alignment
takes), ``ref_rewards`` the rewards of all ``n`` completions of its prompt. With ``dpo_out``, DPO pairs too, made from that
file at the end: each prompt's best completion against its worst (prompts whose completions all
score alike give none).

The output is appended a prompt at a time (all ``n`` lines, then flushed to disk), so a killed
run resumes where it stopped: the prompts already written are skipped, and a partly written last
prompt is dropped first. What produced the output (the prompts file's hash, the policy, the reward,
``n`` and the sampling settings) is recorded beside it (``OUT.source.json``), and a rerun into the
same output with anything else is refused, so two runs never mix in one file.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from griffon.align.examples import read_objects
from griffon.align.preference import real_value
from griffon.data.sources import DataError
from griffon.files import CONFIG_BYTES, read_json

Reward = Callable[[str, str], float]


def load_reward(spec: str) -> Reward:
    """The reward ``spec`` names: ``module:function`` (the module importable from the current
    directory), or a ``.jsonl`` file of ``{"prompt", "completion", "reward"}`` lines, rewards an
    outside scorer gave the completions this command samples (:func:`table_reward`)."""
    if spec.endswith(".jsonl"):
        return table_reward(spec)
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"--reward {spec!r}: give module:function, e.g. my_rewards:score")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward {spec}: cannot import {module_name}: {e}") from None
    finally:
        sys.path.pop(0)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {module_name} has no callable {name!r}")
    return fn


def table_reward(path: str | Path) -> Reward:
    """Rewards looked up by (prompt, completion) in a JSONL file. Sampling is seeded, so the
    completions ``griffon rewards`` lists without ``--reward`` (to be scored elsewhere) are the
    ones it samples again when given their scores."""
    table: dict[tuple[str, str], float] = {}
    for where, obj in read_objects(path):
        key = (obj.get("prompt"), obj.get("completion"))
        if not all(isinstance(k, str) for k in key):
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
        value = real_value(obj.get("reward"))
        if value is None:
            raise DataError(f"{where}: 'reward' is {obj.get('reward')!r}, not a finite real number")
        table[key] = value

    def reward(prompt: str, completion: str) -> float:
        if (prompt, completion) not in table:
            raise ValueError(f"{path} has no reward for the completion {completion[:40]!r} of {prompt[:40]!r}")
        return table[(prompt, completion)]

    return reward


def read_prompts(path: str | Path) -> tuple[list[str], list[str]]:
    """The prompts of a JSONL file, and where each is (``FILE:LINE``, to name in errors)."""
    prompts, wheres = [], []
    for where, obj in read_objects(path):
        if not isinstance(obj.get("prompt"), str):
            raise DataError(f"{where}: 'prompt' must be a string")
        prompts.append(obj["prompt"])
        wheres.append(where)
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts, wheres


def check_output(out: str | Path, inputs: dict[str, str | None], source: dict) -> Path:
    """Refuse an output that is one of the ``inputs`` (name -> path), or that holds the output of
    a run with another ``source`` (what produced it); record ``source`` beside a new output.
    Returns the record's path."""
    out = Path(out)
    for name, path in inputs.items():
        if path is None:
            continue
        linked = out.exists() and Path(path).exists() and os.path.samefile(out, path)
        if linked or Path(path).resolve() == out.resolve():
            raise ValueError(f"--out {out} is the {name}; write the output to another file")
    record = out.with_name(out.name + ".source.json")
    if out.exists() and out.stat().st_size:
        if not record.is_file():
            raise ValueError(f"{out} exists and was not written by griffon rewards (no {record.name}); "
                             "give another --out")  # fmt: skip
        held = read_json(record, CONFIG_BYTES, "a rewards source record")
        changed = sorted(k for k in source.keys() | held.keys() if held.get(k) != source.get(k))
        if changed:
            raise ValueError(f"{out} holds the output of a run with other {', '.join(changed)}; "
                             "give another --out, or the same arguments to resume it")  # fmt: skip
    else:
        from griffon.atomic import atomic_write

        text = json.dumps(source, indent=2) + "\n"
        atomic_write(record, lambda tmp: tmp.write_text(text))
    return record


def _done_prompts(out: Path, n: int) -> int:
    """Prompts already written whole to ``out``; a partial last one is cut off the file."""
    if not out.is_file():
        return 0
    complete = out.read_bytes().split(b"\n")[:-1]  # what follows the last newline was cut short
    whole = len(complete) // n
    keep = b"".join(line + b"\n" for line in complete[: whole * n])
    if len(keep) != out.stat().st_size:  # atomically: a kill now must not lose the whole prompts
        from griffon.atomic import atomic_write

        atomic_write(out, lambda tmp: tmp.write_bytes(keep))
    return whole


def score(reward: Reward, prompt: str, completion: str, where: str | None = None) -> float:
    """The reward of a completion as a float: any real number type is taken; a value that is not
    one, or is not finite as a float, is refused naming the prompt (and its ``FILE:LINE``)."""
    value = reward(prompt, completion)
    number = real_value(value)
    if number is None:
        at = f"{where}: " if where else ""
        raise ValueError(
            f"{at}the reward of {completion[:40]!r} (prompt {prompt[:40]!r}) is {value!r}, not a finite real number"
        )
    return number


def sample_rewards(
    model,
    tokenizer,
    prompts: list[str],
    reward: Reward | None,
    n: int,
    out: str | Path,
    dpo_out: str | Path | None = None,
    max_tokens: int = 64,
    temperature: float = 1.0,
    stop: tuple[str, ...] = (),
    seed: int = 0,
    max_batch: int = 64,
    progress: Callable[[int, int], None] | None = None,
    wheres: list[str] | None = None,
) -> int:
    """Write the QRPO dataset (and DPO pairs) for ``prompts``; returns the prompts done now. The
    completions of prompt i use seeds ``seed + i * n + j``, so a resumed run samples what an
    uninterrupted one would. Without a ``reward``, the completions alone are written, as the
    reward would read them (``{"prompt", "completion"}``), to be scored elsewhere. ``wheres``:
    each prompt's ``FILE:LINE``, to name in errors. The engine is fed at most what it can hold at
    once (its queue), however large ``n``."""
    from griffon.engine import Engine, SamplingParams

    if n < 2:
        raise ValueError(f"--n must be at least 2 (a quantile needs reference rewards), got {n}")
    out = Path(out)
    start = _done_prompts(out, n)
    engine = Engine(model, tokenizer, max_batch=max_batch, prefix_cache_bytes=0)
    per_batch = max(1, max_batch // n)
    capacity = engine.max_queue  # requests wait in the queue until the next step admits them
    done = 0
    for first in range(start, len(prompts), per_batch):
        group = prompts[first : first + per_batch]
        ids = [tokenizer.encode(p) for p in group]
        todo = [(i, j) for i in range(len(group)) for j in range(n)]
        requests: list[list] = [[] for _ in group]
        for part in range(0, len(todo), capacity):
            for i, j in todo[part : part + capacity]:
                params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + (first + i) * n + j,
                                        stop=stop)  # fmt: skip
                requests[i].append(engine.submit(ids[i], params))
            engine.run_until_done()
        for k, (prompt, reqs) in enumerate(zip(group, requests, strict=True)):
            # the reward reads the answer (up to a stop string); the data keep every token sampled,
            # the stop's too, which the policy's log-probability of the completion is taken over
            answers = [r.text.visible(final=True) for r in reqs]
            if reward is None:
                lines = [json.dumps({"prompt": prompt, "completion": a}) for a in answers]
            else:
                where = wheres[first + k] if wheres is not None else None
                rewards = [score(reward, prompt, a, where) for a in answers]
                lines = [json.dumps({"prompt": prompt, "completion": tokenizer.decode(r.tokens), "reward": x,
                                     "ref_rewards": rewards}) for r, x in zip(reqs, rewards, strict=True)]  # fmt: skip
            _append(out, lines)
            done += 1
            if progress is not None:
                progress(start + done, len(prompts))
    if dpo_out is not None and reward is not None:
        write_dpo_pairs(out, n, Path(dpo_out))
    return done


def write_dpo_pairs(qrpo: Path, n: int, out: Path) -> int:
    """DPO pairs from a QRPO dataset of ``n`` completions a prompt: each prompt's best completion
    against its worst (none where all score alike); written atomically, returns the pairs."""
    from griffon.atomic import atomic_write

    rows = [json.loads(line) for line in qrpo.read_text(encoding="utf-8").splitlines()]
    pairs = []
    for first in range(0, len(rows), n):
        group = rows[first : first + n]
        best, worst = max(group, key=lambda r: r["reward"]), min(group, key=lambda r: r["reward"])
        if best["reward"] > worst["reward"]:
            pairs.append(json.dumps({"prompt": best["prompt"], "chosen": best["completion"],
                                     "rejected": worst["completion"]}))  # fmt: skip
    text = "".join(p + "\n" for p in pairs)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return len(pairs)


def _append(path: Path, lines: list[str]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
