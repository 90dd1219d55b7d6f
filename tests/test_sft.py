"""Supervised fine-tuning: examples read and checked, the loss on completions and assistant turns
only, whole examples packed with resets, and ``objective=sft`` training from a checkpoint."""

import json

import numpy as np
import pytest
import torch

from griffon.align.chat import GRIFFON_TEMPLATE, ChatTemplate
from griffon.align.sft import PackedRows, SFTLoader, pack, read_examples, tokenize_example
from griffon.checkpoint import from_pretrained, resolve
from griffon.cli import main
from griffon.data.sources import DataError
from griffon.data.tokenizers import ByteTokenizer
from griffon.train.losses import next_token_loss

TINY = [
    "data.seq_len=128", "data.batch_size=4", "dtype=fp32", "max_minutes=null", "max_steps=3",
    "eval_batches=1", "final_eval_batches=2", "eval_every=100", "log_every=1", "optim.warmup_steps=1",
]  # fmt: skip
TEMPLATE = ChatTemplate(GRIFFON_TEMPLATE, "<|end|>")


def _examples(n=24):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        if i % 2:
            out.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
        else:
            out.append({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                     {"role": "assistant", "content": str(a + b)},
                                     {"role": "user", "content": "and doubled?"},
                                     {"role": "assistant", "content": str(2 * (a + b))}]})  # fmt: skip
    return out


def _write(path, examples):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def test_the_loss_counts_completions_and_assistant_turns_only():
    tok = ByteTokenizer()
    ids, mask = tokenize_example({"prompt": "1+2=", "completion": "3"}, tok, TEMPLATE)
    assert tok.decode(ids) == "1+2=3" and mask == [False] * 4 + [True]
    chat = _examples()[0]
    ids, mask = tokenize_example(chat, tok, TEMPLATE)
    assert tok.decode(ids) == TEMPLATE.render(chat["messages"], add_generation_prompt=False)
    learned = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    replies = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
    assert learned == "".join(f"{r}<|end|>\n" for r in replies)  # each reply and its end of turn


def test_packing_keeps_examples_whole_resets_at_each_and_never_targets_a_prompt_or_padding():
    tok = ByteTokenizer()
    examples = [tokenize_example(e, tok, TEMPLATE) for e in _examples()]
    rows = pack(examples, seq_len=160)
    assert rows.truncated == 0 and rows.tokens.shape[1] == 161
    found = []
    for r in range(len(rows.tokens)):
        starts = list(np.flatnonzero(rows.segment_pos[r] == 0)) + [161]
        for a, b in zip(starts, starts[1:], strict=False):
            ids, targets = rows.tokens[r, a:b].tolist(), rows.targets[r, a:b].tolist()
            found.append((ids, targets))
    # every example is in one segment of one row, as it was, its first token never a target;
    # the rest (padding, seen as segments of zeros) holds no target
    pieces = {tuple(ids): targets for ids, targets in found}
    for ids, mask in examples:
        assert pieces.pop(tuple(ids)) == [False] + mask[1:]
    assert all(not any(t) for t in pieces.values())
    assert rows.targets.sum() == sum(sum(m[1:]) for _, m in examples)
    cut = pack(examples, seq_len=20)
    assert cut.truncated == sum(len(ids) > 21 for ids, _ in examples)


def test_the_loader_shuffles_rows_by_epoch_and_resumes_exactly():
    rows = PackedRows(np.arange(40).reshape(10, 4), np.zeros((10, 4), np.int64), np.ones((10, 4), bool), 0)
    loader = SFTLoader(rows, batch_size=3, seed=1)
    first = [next(loader)[0] for _ in range(5)]  # 3 steps an epoch: into the second
    again = SFTLoader(rows, batch_size=3, seed=1)
    again.load_state_dict({"epoch": 1, "step": 1, "seed": 1})
    assert torch.equal(next(again)[0], first[4])
    seen = torch.cat(first[:3]).flatten().tolist()
    assert len(set(seen)) == 36  # one epoch: 9 distinct rows


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", ":2: not JSON"),
        ('{"prompt": "a"}', ":2: 'completion' must be a string"),
        ('{"prompt": "a", "completion": ""}', ":2: the completion is empty"),
        ('{"messages": [{"role": "king", "content": "x"}]}', ":2: message 0 has role 'king'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', ":2: the chat has no assistant turn"),
        ('{"text": "x"}', ':2: an example has "prompt" and "completion", or "messages"'),
    ],
)
def test_bad_examples_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_examples(path)


def _train(out, *extra):
    argv = ["train", "--out", str(out), *[f"--set={s}" for s in TINY], *extra]
    assert main(argv) == 0


def test_sft_from_a_checkpoint_learns_the_completions(tmp_path, capsys):
    _train(tmp_path / "base", "--set=model=griffin-tiny")
    data = _write(tmp_path / "sft.jsonl", _examples(48))
    _train(tmp_path / "sft", "--init", str(tmp_path / "base"), "--set=objective=sft", f"--set=data.path={data}",
           "--set=max_steps=12", "--set=optim.lr=3e-3")  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "sft" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    # step 1's loss is the base model's mean loss over the first batch's completion tokens
    base = from_pretrained(resolve(tmp_path / "base")[0]).eval()
    from griffon.align.sft import SFTData

    sft = SFTData.open(str(data), "bytes", None, 128, 0.1, 0, 256)
    tokens, seg, targets = next(SFTLoader(sft.train, 4, seed=0))
    with torch.no_grad():
        logits, _ = base(tokens[:, :-1], seg[:, :-1])
    want, n = next_token_loss(logits, tokens[:, 1:], targets[:, 1:])
    assert losses[0] == pytest.approx(want.item(), rel=1e-5) and n < targets.numel() / 2
    final = next(r for r in records if r["kind"] == "final_eval")
    assert np.isfinite(final["val_loss"])


def test_bad_sft_data_stops_before_anything_is_written(tmp_path, capsys):
    _train(tmp_path / "base", "--set=model=griffin-tiny")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n')
    argv = ["train", "--out", str(tmp_path / "new"), "--init", str(tmp_path / "base"), "--set=objective=sft"]
    assert main([*argv, f"--set=data.path={bad}"]) == 2
    assert f"{bad}:2: the completion is empty" in capsys.readouterr().err
    assert main([*argv, f"--set=data.path={tmp_path / 'none.jsonl'}"]) == 2
    assert "objective=sft reads a JSONL file of examples" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_chat_the_template_refuses_is_named_by_its_line(tmp_path):
    from griffon.align.chat import GEMMA_TEMPLATE

    path = _write(tmp_path / "c.jsonl", [_examples()[0], {"messages": [{"role": "system", "content": "x"},
                                                                       {"role": "assistant", "content": "y"}]}])  # fmt: skip
    with pytest.raises(DataError, match=r"c.jsonl:2: the chat template failed to render: System role not supported"):
        read_examples(path, ChatTemplate(GEMMA_TEMPLATE, "<end_of_turn>"))
    assert len(read_examples(path)) == 2  # without a template, only the fields are checked


def test_examples_with_nothing_to_learn_are_counted_and_refused_when_most_are(tmp_path, capsys):
    """Prompts longer than seq_len (or a template that drops the replies) leave no completion token
    in a row: most such examples refuse the run before anything is written, naming the seq_len
    that keeps them; a few are warned of. Without this, training ran at loss 0 and the final
    evaluation divided by zero."""
    from griffon.align.sft import SFTData

    long = [{"prompt": "x" * 200, "completion": "y"} for _ in range(20)]
    data = _write(tmp_path / "long.jsonl", long + _examples(4))
    with pytest.raises(DataError, match=r"^20 of the 24 examples have no token to learn within data.seq_len=128; "
                                        r"data.seq_len=200 would keep them all$"):  # fmt: skip
        SFTData.open(str(data), "bytes", None, 128, 0.1, 0, 256)
    some = _write(tmp_path / "some.jsonl", long[:2] + _examples(22))
    assert SFTData.open(str(some), "bytes", None, 128, 0.1, 0, 256).unlearnable == 2
    empty = tmp_path / "empty.jinja"  # renders no reply: nothing to learn anywhere
    empty.write_text(
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    chats = _write(tmp_path / "chats.jsonl", _examples(8)[0::2])
    with pytest.raises(DataError, match=r"^4 of the 4 examples have no token to learn .* at any data.seq_len$"):
        SFTData.open(str(chats), "bytes", str(empty), 128, 0.1, 0, 256)
    _train(tmp_path / "base", "--set=model=griffin-tiny")
    argv = ["train", "--out", str(tmp_path / "new"), "--init", str(tmp_path / "base"), "--set=objective=sft",
            *[f"--set={s}" for s in TINY]]  # fmt: skip
    assert main([*argv, f"--set=data.path={data}"]) == 2
    assert "20 of the 24 examples have no token to learn" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


OWN_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def test_the_chat_template_travels_with_the_run(tmp_path, monkeypatch, capsys):
    """An SFT run trained with a template of its own keeps it: ``sample --chat`` (with a system
    message and a multi-turn conversation), the server and the HF export all render with it."""
    import griffon.decode
    from griffon.align.chat import ChatTemplate
    from griffon.checkpoint import load_for_inference

    _train(tmp_path / "base", "--set=model=griffin-tiny")
    template_file = tmp_path / "own.jinja"
    template_file.write_text(OWN_TEMPLATE)
    data = _write(tmp_path / "sft.jsonl", _examples(16))
    _train(tmp_path / "sft", "--init", str(tmp_path / "base"), "--set=objective=sft", f"--set=data.path={data}",
           f"--set=data.chat_template={template_file}")  # fmt: skip
    template_file.unlink()  # the run holds its own copy
    assert (tmp_path / "sft" / "chat_template.jinja").read_text() == OWN_TEMPLATE
    own = ChatTemplate(OWN_TEMPLATE, "<|end|>")
    tok = load_for_inference(tmp_path / "sft")[1]

    seen = []
    monkeypatch.setattr(griffon.decode, "stream_tokens", lambda model, ids, *a, **k: seen.append(ids) or iter(()))
    conversation = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "3"}]
    (tmp_path / "chat.json").write_text(json.dumps(conversation))
    argv = ["sample", str(tmp_path / "sft"), "--chat", "--system", "be brief", "--messages", str(tmp_path / "chat.json"),
            "--prompt", "doubled?"]  # fmt: skip
    assert main(argv) == 0
    want = [{"role": "system", "content": "be brief"}, *conversation, {"role": "user", "content": "doubled?"}]
    assert tok.decode(seen[-1]) == own.render(want)

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from griffon.engine import Engine
    from griffon.serve.server import create_app

    model = load_for_inference(tmp_path / "sft")[0]
    with TestClient(create_app(Engine(model, tok, step="model"), "sft", warm_up=False)) as client:
        assert client.app.state.server.ready.wait(60)
        r = client.post("/v1/chat/completions", json={"messages": want, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(tok.encode(own.render(want)))

    assert main(["export-hf", str(tmp_path / "sft"), str(tmp_path / "hf")]) == 0
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.apply_chat_template(want, tokenize=False, add_generation_prompt=True) == own.render(want)


def test_a_template_that_raises_is_a_clear_error(tmp_path):
    from griffon.align.sft import SFTData

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }}{{ 1 / 0 }}{% endfor %}")
    data = _write(tmp_path / "sft.jsonl", _examples(4))
    with pytest.raises(DataError, match=r"sft.jsonl:1: the chat template failed to render: ZeroDivisionError"):
        SFTData.open(str(data), "bytes", str(bad), 128, 0.1, 0, 256)
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from griffon.align.chat import ChatTemplate
    from griffon.engine import Engine
    from griffon.model import Griffon
    from griffon.presets import get_preset
    from griffon.serve.server import create_app

    engine = Engine(Griffon(get_preset("griffin-tiny")), ByteTokenizer(), step="model")
    app = create_app(engine, "x", warm_up=False, chat_template=ChatTemplate(bad.read_text(), "<|end|>"))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 400 and "ZeroDivisionError" in r.json()["error"]["message"]
