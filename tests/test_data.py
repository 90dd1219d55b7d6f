"""Tokenizers, data preparation and the packing loader."""

import gzip
import json

import numpy as np
import pytest
import torch

from griffon.data.corpus import default_corpus
from griffon.data.loader import PackedLoader, TokenSplit, sequence_batches
from griffon.data.prepare import prepare
from griffon.data.sources import DataError, iter_documents
from griffon.data.tokenizers import ByteTokenizer, TokenizerError, load_tokenizer, train_bpe

TEXTS = [f"Document {i}: " + "to be or not to be, ünïcödé ✓ " * (i + 3) for i in range(12)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(TEXTS):
            f.write(json.dumps({"title": f"d{i}", "text": t}) + "\n")
    return path


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Hark! ünïcödé ✓"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) == len(text.encode("utf-8"))


def test_bpe_trains_saves_loads_and_counts_bytes(tmp_path):
    train_bpe(iter(TEXTS), 300, tmp_path / "tok" / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tok")
    text = TEXTS[3]
    ids = again.encode(text)
    assert again.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # it merged something
    assert again.token_bytes()[ids].sum() == len(text.encode("utf-8"))


def test_sentencepiece_model_loads(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS * 5))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=290, byte_fallback=True, minloglevel=2)  # fmt: skip
    tok = load_tokenizer(tmp_path / "sp.model")
    text = "to be or not to be"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).vocab_size == 290


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a tokenizer JSON"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_prepare_splits_by_document(jsonl, tmp_path):
    meta = prepare([jsonl], ByteTokenizer(), tmp_path / "out", val_fraction=0.25, seed=3, progress=False)
    assert meta["splits"]["val"]["documents"] == 3 and meta["splits"]["train"]["documents"] == 9
    val = TokenSplit.open(tmp_path / "out", "val")
    docs = {
        bytes(val.tokens[a:b].astype(np.uint8)).decode()
        for a, b in zip(val.doc_offsets[:-1], val.doc_offsets[1:], strict=True)
    }
    assert docs <= set(TEXTS)  # whole documents, unchanged
    again = prepare([jsonl], ByteTokenizer(), tmp_path / "again", val_fraction=0.25, seed=3, progress=False)
    assert again["splits"] == meta["splits"]  # deterministic, hashes included
    assert load_tokenizer(tmp_path / "out").vocab_size == 256


def test_prepare_reads_text_and_embedded_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second one")
    meta = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], ByteTokenizer(), tmp_path / "o", 0.5, progress=False)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 2
    assert sum(1 for _ in iter_documents(default_corpus())) == 42


def test_prepare_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "d.parquet")
    meta = prepare([tmp_path / "d.parquet"], ByteTokenizer(), tmp_path / "o", 0.25, progress=False)
    assert meta["splits"]["train"]["documents"] == 9


def test_prepare_reads_a_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))}).save_to_disk(str(tmp_path / "ds"))
    meta = prepare([tmp_path / "ds"], ByteTokenizer(), tmp_path / "o", 0.25, progress=False)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(TEXTS)
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in TEXTS)


def test_prepare_errors(jsonl, tmp_path):
    with pytest.raises(DataError, match="input not found"):
        prepare([tmp_path / "missing.jsonl"], ByteTokenizer(), tmp_path / "o", progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no documents found"):
        prepare([tmp_path / "empty.jsonl"], ByteTokenizer(), tmp_path / "o", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: expected an object with a string field 'text'"):
        prepare([tmp_path / "bad.jsonl"], ByteTokenizer(), tmp_path / "o", progress=False)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported input"):
        prepare([tmp_path / "x.csv"], ByteTokenizer(), tmp_path / "o", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        prepare([jsonl], ByteTokenizer(), tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "keep").read_text() == "x"


@pytest.fixture
def split(jsonl, tmp_path):
    prepare([jsonl], ByteTokenizer(), tmp_path / "data", val_fraction=0.25, progress=False)
    return TokenSplit.open(tmp_path / "data", "train")


def test_loader_segment_pos_marks_document_starts(split):
    loader = PackedLoader(split, seq_len=50, batch_size=3, seed=1)
    starts = {bytes(split.tokens[a : a + 9].astype(np.uint8)) for a in split.doc_offsets[:-1]}
    for _ in range(5):
        tokens, seg = next(loader)
        assert tokens.shape == seg.shape == (3, 51)
        for row_t, row_s in zip(tokens, seg, strict=True):
            diffs = row_s[1:] - row_s[:-1]
            assert torch.all((diffs == 1) | (row_s[1:] == 0))  # +1 inside a document, 0 at a new one
            for t in torch.nonzero(row_s == 0).flatten().tolist():
                if t + 9 <= 51:
                    assert bytes(row_t[t : t + 9].tolist()) in starts


def test_loader_is_deterministic_and_resumable(split):
    a = PackedLoader(split, 40, 2, seed=5)
    first = [next(a) for _ in range(7)]
    b = PackedLoader(split, 40, 2, seed=5)
    for _ in range(3):
        next(b)
    state = b.state_dict()
    c = PackedLoader(split, 40, 2, seed=5)
    c.load_state_dict(state)
    for want in first[3:]:
        got = next(c)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    d = PackedLoader(split, 40, 2, seed=6)
    assert not torch.equal(next(d)[0], first[0][0])


def test_loader_shards_across_ranks(split):
    single = PackedLoader(split, 30, 4, seed=2)
    ranks = [PackedLoader(split, 30, 2, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        whole = next(single)[0]
        parts = torch.cat([next(r)[0] for r in ranks])
        assert torch.equal(whole, parts)


def test_eval_batches_cover_split_once(split):
    n = sum(t.shape[0] for t, _ in sequence_batches(split, 25, 4))
    assert n == (split.n_tokens - 1) // 25


def test_loader_rejects_too_little_data(split):
    with pytest.raises(DataError, match="cannot fill one step"):
        PackedLoader(split, seq_len=10_000, batch_size=64)


def test_token_bytes_saved(split, tmp_path):
    assert np.load(tmp_path / "data" / "token_bytes.npy").sum() == 256


def test_failed_preparation_leaves_nothing(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": ""}\n{"text": ""}\n')
    with pytest.raises(DataError, match="training split is empty"):
        prepare([tmp_path / "empty.jsonl"], ByteTokenizer(), tmp_path / "o", 0.34, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]  # no shards, no temporary directory


def test_non_utf8_input_is_named_by_file_and_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(DataError, match=r"a.txt:2: not UTF-8 text \(byte 0xff"):
        prepare([tmp_path / "a.txt"], ByteTokenizer(), tmp_path / "o", 0.0, progress=False)
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: not UTF-8 text \(byte 0xe9"):
        prepare([tmp_path / "b.jsonl"], ByteTokenizer(), tmp_path / "o", 0.0, progress=False)


def _metaspace_tokenizer(path):
    """An HF tokenizer.json in the Llama style: Metaspace pre-tokenizer ("▁" prepended) and byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>", *alphabet]))
    tok.save(str(path))
    return load_tokenizer(path)


TOKENIZER_KINDS = ["bytes", "bpe", "metaspace", "sentencepiece"]
UNSEEN_TEXTS = ["to be or not to be", "ünïcödé ✓ and 日本語, not in any training text", " leading space", "x"]


def _tokenizer(kind, tmp_path):
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return train_bpe(iter(TEXTS), 300, tmp_path / "tok.json")
    if kind == "metaspace":
        return _metaspace_tokenizer(tmp_path / "tok.json")
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS * 5))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=290, byte_fallback=True, minloglevel=2)  # fmt: skip
    return load_tokenizer(tmp_path / "sp.model")


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_token_byte_counts_sum_to_the_decoded_text(kind, tmp_path):
    """Bits per byte divide by these counts: the first token of a text must not count a
    word-boundary marker the decoded text does not hold ("to be or not to be" is 18 bytes)."""
    tok = _tokenizer(kind, tmp_path)
    for text in UNSEEN_TEXTS:
        ids = tok.encode(text)
        decoded = tok.decode(ids)
        assert tok.byte_counts(ids).sum() == len(decoded.encode("utf-8")), (text, decoded)
        if decoded == text:
            assert tok.byte_counts(ids).sum() == len(text.encode("utf-8"))
    assert tok.byte_counts(tok.encode("to be or not to be")).sum() == 18


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_hf_export_encodes_like_griffon(kind, tmp_path):
    """``save_hf`` writes what ``AutoTokenizer`` loads, with the same ids for every text (special
    tokens requested or not: none is added) and the same decoded text."""
    transformers = pytest.importorskip("transformers")
    tok = _tokenizer(kind, tmp_path)
    tok.save_hf(tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in [*UNSEEN_TEXTS, "a\n\nb  c\t", TEXTS[3]]:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids) == tok.decode(ids)
    assert hf.eos_token_id == (tok.eos_id if tok.eos_id is not None else ord("\n"))


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_incremental_detokenisation_equals_decoding_the_whole(kind, tmp_path):
    """TextStream decodes a window per token; whenever the whole sequence's decode ends in a
    complete character, its text is that decode (random ids too: broken UTF-8, lone word-boundary
    markers). Byte-fallback decoders turn a whole run of bytes into replacement marks when the run
    is not valid UTF-8 as a whole (a character, then the first byte of the next), which a stream
    that has already shown the character does not take back: there random ids are not compared."""
    import random

    from griffon.decode.output import TextStream

    tok = _tokenizer(kind, tmp_path)
    rng = random.Random(0)
    sequences = [tok.encode(t) for t in [*UNSEEN_TEXTS, *TEXTS[:3]]]
    if kind in ("bytes", "bpe"):
        sequences += [[rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 60))] for _ in range(40)]
    compared = 0
    for ids in sequences:
        ids = [t for t in ids if t != tok.eos_id]
        stream = TextStream(tok)
        for n, token in enumerate(ids, 1):
            stream.push(token)
            whole = tok.decode(ids[:n])
            if not whole.endswith("\ufffd"):
                assert stream.text == whole, (kind, ids[:n])
                compared += 1
        assert stream.visible(final=True) == tok.decode(ids)
    assert compared > 100
