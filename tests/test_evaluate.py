"""Scoring whole documents: chunk- and batch-size invariance, equality with one full forward,
per-position buckets, sliding windows for global attention, and ``griffon eval``'s errors."""

import json
import math
import shutil

import pytest
import torch
from torch.nn import functional as F

from griffon import Griffon, get_preset, save_pretrained
from griffon.cli import main
from griffon.data.tokenizers import ByteTokenizer
from griffon.eval.score import score_documents

from memory import peak_traced_bytes

BYTES = torch.ones(2, 256, dtype=torch.long)


def _docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _full_forward_nats(model, doc):
    with torch.no_grad():
        logits, _ = model(torch.tensor(doc)[None])
    return F.cross_entropy(logits[0, :-1].double(), torch.tensor(doc[1:]), reduction="sum").item()


@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny"])
def test_scores_do_not_depend_on_chunk_or_batch_size(preset):
    torch.manual_seed(0)
    model = Griffon(get_preset(preset))
    docs = _docs([1, 2, 300, 1100, 57, 64, 65])
    want = score_documents(model, docs, BYTES, seq_len=1024, batch_size=1)
    assert want.tokens == sum(len(d) - 1 for d in docs if d) and want.documents == 7
    for seq_len in (64, 257, 1024):
        for batch_size in (1, 3, 8):
            got = score_documents(model, docs, BYTES, seq_len=seq_len, batch_size=batch_size)
            assert (got.tokens, got.bytes) == (want.tokens, want.bytes)
            assert got.nats == pytest.approx(want.nats, rel=1e-6), (seq_len, batch_size)


@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny"])
def test_stateful_scoring_equals_one_full_forward_per_document(preset):
    torch.manual_seed(0)
    model = Griffon(get_preset(preset)).eval()
    docs = _docs([40, 300, 129])  # longer than the window (16) and than the chunks
    got = score_documents(model, docs, BYTES, seq_len=50, batch_size=2, per_doc=True)
    for doc, row in zip(docs, got.per_doc, strict=True):
        assert row["loss"] * row["tokens"] == pytest.approx(_full_forward_nats(model, doc), rel=1e-6)
    assert got.nats == pytest.approx(sum(_full_forward_nats(model, d) for d in docs), rel=1e-6)


def test_position_buckets_sum_to_the_total():
    torch.manual_seed(0)
    model = Griffon(get_preset("griffin-tiny"))
    docs = _docs([3, 300, 700])
    result = score_documents(model, docs, torch.randint(1, 4, (2, 256)), seq_len=128, by_position=True).to_dict()
    buckets = result["by_position"]
    assert [b["from"] for b in buckets] == [2**k for k in range(10)]  # positions 1 .. 699
    assert sum(b["tokens"] for b in buckets) == result["tokens"]
    assert sum(b["bytes"] for b in buckets) == result["bytes"]
    assert sum(b["loss"] * b["tokens"] for b in buckets) == pytest.approx(result["loss"] * result["tokens"], rel=1e-9)
    assert buckets[3]["tokens"] == 2 * 8  # positions 8..15 of the two long documents


def test_global_attention_scores_every_token_once_in_sliding_windows():
    torch.manual_seed(0)
    model = Griffon(get_preset("mqa-tiny").replace(max_seq_len=None)).eval()
    docs = _docs([100, 37])
    whole = score_documents(model, docs, BYTES, seq_len=128)
    assert whole.nats == pytest.approx(sum(_full_forward_nats(model, d) for d in docs), rel=1e-6)
    windows = score_documents(model, docs, BYTES, seq_len=32, stride=8)
    assert windows.tokens == whole.tokens
    capped = score_documents(Griffon(get_preset("mqa-tiny")), _docs([300]), BYTES, seq_len=1024)  # max_seq_len 128
    assert capped.tokens == 299  # windows of 128 tokens every 64, each token scored once
    # the first window's tokens see the same context as in the full forward
    first = score_documents(model, [docs[0][:32]], BYTES, seq_len=32)
    assert first.nats == pytest.approx(_full_forward_nats(model, docs[0][:32]), rel=1e-6)


@pytest.fixture
def checkpoint(tmp_path):
    model = Griffon(get_preset("griffin-tiny"))
    save_pretrained(model, tmp_path / "ckpt")
    ByteTokenizer().save(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _fails(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_griffon_eval_command(checkpoint, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog " * 30)
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "a short one"}) + "\n" + json.dumps({"text": "x" * 80}) + "\n"
    )
    out = tmp_path / "r.json"
    argv = [
        "eval",
        str(checkpoint),
        "--text",
        str(tmp_path / "a.txt"),
        "--seq-len",
        "100",
        "--per-doc",
        "--json",
        str(out),
    ]
    assert main(argv + ["--png", str(tmp_path / "p.png")]) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == 30 * 44 - 1 and len(result["per_doc"]) == 1 and result["by_position"]
    assert math.isclose(result["bits_per_byte"], result["loss"] / math.log(2))  # bytes: one byte per token
    assert (tmp_path / "p.png").stat().st_size > 0
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    assert main(["eval", str(checkpoint), str(other), "--jsonl", str(tmp_path / "b.jsonl"), "--json", str(out)]) == 0
    both = json.loads(out.read_text())
    assert set(both) == {str(checkpoint), str(other)} and both[str(other)]["tokens"] == 10 + 79
    capsys.readouterr()


def test_griffon_eval_errors(checkpoint, tmp_path, capsys):
    from griffon.data.prepare import prepare
    from griffon.data.tokenizers import train_bpe

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\n")
    (tmp_path / "ok.txt").write_text("some text " * 20)
    _fails(["eval", str(checkpoint), "--text", str(tmp_path / "empty.txt")], capsys, "nothing to score")
    _fails(["eval", str(checkpoint), "--text", str(tmp_path / "bad.txt")], capsys, "bad.txt:2: not UTF-8 text")
    _fails(["eval", str(checkpoint)], capsys, "give the documents to score")
    bare = tmp_path / "bare"
    save_pretrained(Griffon(get_preset("griffin-tiny")), bare)
    _fails(["eval", str(bare), "--text", str(tmp_path / "ok.txt")], capsys, "no tokenizer.json or tokenizer.model")
    texts = [f"text number {i} " * 30 for i in range(20)]
    tok = train_bpe(iter(texts), 300, tmp_path / "tok.json")
    prepare([tmp_path / "ok.txt"] * 4, tok, tmp_path / "data", val_fraction=0.25, progress=False)
    _fails(["eval", str(checkpoint), "--data", str(tmp_path / "data")], capsys, "prepared with another tokenizer")
    with pytest.raises(SystemExit):
        main(["eval", str(checkpoint), "--text", str(tmp_path / "ok.txt"), "--seq-len", "0"])
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_packed_evaluation_counts_a_document_start_with_its_own_bytes():
    """A sentencepiece-style first token decodes without its word-boundary space: row 1 of the table."""
    from griffon.eval.score import evaluate

    torch.manual_seed(0)
    model = Griffon(get_preset("griffin-tiny"))
    tokens = torch.randint(0, 256, (1, 21))
    seg = torch.cat([torch.arange(9), torch.arange(12)])[None]  # a document starts at position 9
    table = torch.stack([torch.full((256,), 3), torch.full((256,), 2)])
    got = evaluate(model, [(tokens, seg)], table, torch.device("cpu"))
    # 20 targets: the one at position 9 starts a document (2 bytes), the other 19 have 3
    assert got["val_loss"] / math.log(2) / got["val_bpb"] == pytest.approx((19 * 3 + 2) / 20)


@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny", "mqa-tiny"])
def test_continuations_share_their_context_and_match_a_full_forward(preset, monkeypatch):
    from griffon.eval.score import score_continuations

    torch.manual_seed(0)
    model = Griffon(get_preset(preset)).eval()
    ctx_a, ctx_b = _docs([40, 7], seed=1)
    requests = [(ctx_a, [5]), (ctx_a, [7, 8, 9]), (ctx_b, [1, 2]), (ctx_a, list(range(30)))]
    prefilled, calls = [], []
    import griffon.eval.score

    prefill, forward = griffon.eval.score.prefill, model.forward
    monkeypatch.setattr(
        griffon.eval.score, "prefill", lambda m, p, *a, **k: (prefilled.extend(p), prefill(m, p, *a, **k))[1]
    )
    monkeypatch.setattr(model, "forward", lambda *a, **k: (calls.append(1), forward(*a, **k))[1])
    got = score_continuations(model, requests, batch_size=2, chunk=16)
    assert sorted(map(list, prefilled)) == sorted([ctx_a, ctx_b])  # each context read once, both in one batch
    # three chunks of 16 for the prefill; the continuations two rows at a time, longest first:
    # range(30) with [7, 8, 9], then [1, 2] with [5]
    assert len(calls) == 3 + 2
    for batch_size in (1, 3, 8):
        for a, b in zip(score_continuations(model, requests, batch_size, chunk=16), got, strict=True):
            assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    monkeypatch.undo()
    for (context, continuation), (logprob, greedy) in zip(requests, got, strict=True):
        with torch.no_grad():
            logits, _ = model(torch.tensor(context + continuation)[None])
        logp = logits[0, len(context) - 1 : -1].double().log_softmax(-1)
        want = logp[torch.arange(len(continuation)), torch.tensor(continuation)].sum().item()
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(continuation)).all())
    with torch.no_grad():  # a continuation greedy decoding produces is flagged greedy
        greedy_next = int(model(torch.tensor(ctx_b)[None])[0][0, -1].argmax())
    assert score_continuations(model, [(ctx_b, [greedy_next])])[0][1]


@pytest.mark.parametrize("preset", ["griffin-tiny", "mqa-tiny"])
def test_a_document_in_pieces_scores_as_a_whole_in_bounded_memory(preset):
    """A document handed over as an iterator of pieces scores as the same document in one list,
    and only a chunk's worth of it is held: memory does not grow with its length."""
    import numpy as np

    torch.manual_seed(0)
    model = Griffon(get_preset(preset))
    (doc,) = _docs([3001])
    cuts = [0, 1, 700, 701, 2048, 2999, 3001]
    pieces = (np.array(doc[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))
    whole = score_documents(model, [doc, doc[:50]], BYTES, seq_len=256, batch_size=2)
    split = score_documents(model, iter([pieces, doc[:50]]), BYTES, seq_len=256, batch_size=2)
    assert split.tokens == whole.tokens and split.nats == pytest.approx(whole.nats, rel=1e-9)

    def stream(n: int):
        g = np.random.default_rng(0)
        return (g.integers(0, 256, 1000) for _ in range(n // 1000))

    peaks = [
        peak_traced_bytes(lambda n=n: score_documents(model, [stream(n)], BYTES, seq_len=128)) for n in (4_000, 64_000)
    ]
    # sixteen times the tokens: about the same memory (allocator noise, ~100 kB here); the 60k
    # extra tokens held as int64 would be 480 kB more
    assert peaks[1] - peaks[0] < 256 * 1024, peaks


def test_text_pieces_cut_at_line_breaks_and_character_boundaries(tmp_path, monkeypatch):
    from griffon.data import sources

    text = "première ligne\n" + "ü€😀" * 40 + "\nshort\n\n" + "x" * 30 + "é"
    (tmp_path / "t.txt").write_text(text)
    monkeypatch.setattr(sources, "PIECE_BYTES", 7)
    (pieces,) = list(sources.iter_document_pieces(tmp_path / "t.txt"))
    pieces = list(pieces)
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p.endswith("\n") for p in pieces if "\n" in p)  # a piece with a line break ends at one


def test_griffon_eval_reads_big_files_a_piece_at_a_time_and_refuses_what_is_not_a_file(
    checkpoint, tmp_path, capsys, monkeypatch
):
    import os

    from griffon.data import sources

    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    out = tmp_path / "r.json"
    argv = ["eval", str(checkpoint), "--text", str(tmp_path / "a.txt"), "--json", str(out)]
    assert main([*argv, "--seq-len", "64"]) == 0
    whole = json.loads(out.read_text())
    monkeypatch.setattr(sources, "PIECE_BYTES", 100)  # the byte tokenizer: pieces change no token
    assert main([*argv, "--seq-len", str(10**12)]) == 0  # the chunk is bounded, not 10^12 tokens
    pieced = json.loads(out.read_text())
    assert pieced["tokens"] == whole["tokens"] and pieced["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    capsys.readouterr()
    _fails(["eval", str(checkpoint), "--text", "/dev/zero"], capsys, "/dev/zero is not a regular file")
    os.mkfifo(tmp_path / "fifo")
    _fails(["eval", str(checkpoint), "--text", str(tmp_path / "fifo")], capsys, "fifo is not a regular file")
