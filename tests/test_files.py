"""Files a user names (griffon.files): regular files only, whole files within a size bound, JSON
Lines streamed a bounded line at a time and split on newlines only; every command's file options
go through it, so /dev/zero, a FIFO, an oversized key or template and a huge line are refused in one
line naming the file and the bound, quickly and without blocking."""

import json
import os
import time

import pytest

from griffon.align.examples import read_objects
from griffon.cli import main
from griffon.files import FileError, iter_lines, read_text


def _fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_devices_fifos_and_directories_are_refused_without_reading(tmp_path):
    for path, kind in (("/dev/zero", "not a regular file"), (_fifo(tmp_path), "not a regular file"),
                       (tmp_path, "a directory")):  # fmt: skip
        t0 = time.perf_counter()
        with pytest.raises(FileError, match=kind):
            read_text(path, 1024, "a chat template")
        with pytest.raises(FileError, match=kind):
            list(iter_lines(path, "a JSONL file"))
        assert time.perf_counter() - t0 < 5  # a FIFO with no writer would block an open() for ever
    with pytest.raises(FileError, match="cannot read a chat template .*No such file"):
        read_text(tmp_path / "missing", 1024, "a chat template")


def test_whole_files_are_bounded_and_lines_are_streamed_with_a_bound(tmp_path):
    key = tmp_path / "key"
    key.write_text("k" * 2048)
    assert read_text(key, 2048, "an API key file") == "k" * 2048
    with pytest.raises(
        FileError, match=r"^an API key file .*key is larger than 1 KiB, the bound for an API key files$"
    ):
        read_text(key, 1024, "an API key file")
    lines = tmp_path / "lines.jsonl"
    lines.write_bytes(b'{"a": 1}\r\n' + b'{"b": "' + b"x" * 5000 + b'"}\n' + b"tail")
    with pytest.raises(FileError, match=r"lines.jsonl:2: the line is longer than 4 KiB"):
        list(iter_lines(lines, "a JSONL file", max_line=4096))
    assert [n for n, _ in iter_lines(lines, "x", max_line=8192)] == [1, 2, 3]
    assert next(iter_lines(lines, "x"))[1] == '{"a": 1}'
    exact = tmp_path / "exact"
    exact.write_bytes(b"y" * 16 + b"\n")  # a line of exactly the bound, with its newline
    assert list(iter_lines(exact, "x", max_line=16)) == [(1, "y" * 16)]


def test_corpus_documents_are_read_a_bounded_line_at_a_time(tmp_path, monkeypatch):
    import gzip

    import griffon.data.sources as sources

    monkeypatch.setattr(sources, "DOCUMENT_LINE_BYTES", 64)
    for name, opener in (("c.jsonl", open), ("c.jsonl.gz", gzip.open)):
        with opener(tmp_path / name, "wb") as f:
            f.write(b'{"text": "short"}\n{"text": "' + b"x" * 100 + b'"}\n')
        docs = sources.iter_documents(tmp_path / name)
        assert next(docs) == "short"
        with pytest.raises(FileError, match=rf"{name}:2: the line is longer than 64 bytes, the bound for a document"):
            next(docs)


def test_jsonl_lines_split_on_newline_only(tmp_path):
    """json.dumps(..., ensure_ascii=False) writes U+2028, U+2029 and U+0085 unescaped; they are
    not line breaks in JSON Lines (str.splitlines would split there)."""
    rows = [{"prompt": "a\u2028b", "completion": "c\u0085d\u2029e"}, {"prompt": "x\x1cy", "completion": "z"}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [obj for _, obj in read_objects(path)] == rows


def test_every_file_option_refuses_devices_and_fifos_in_one_line(tmp_path, capsys):
    from griffon.checkpoint import save_pretrained
    from griffon.data.tokenizers import ByteTokenizer
    from griffon.model import Griffon
    from griffon.presets import get_preset

    ckpt = tmp_path / "ckpt"
    save_pretrained(Griffon(get_preset("hawk-tiny")), ckpt)
    ByteTokenizer().save(ckpt)
    fifo = _fifo(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    scores = tmp_path / "scores.jsonl"  # a FIFO named as a table of rewards
    os.mkfifo(scores)
    for bad in ("/dev/zero", str(fifo)):
        for argv in (
            ["rewards", bad, "--policy", str(ckpt), "--out", str(tmp_path / "out.jsonl")],
            [
                "rewards",
                str(prompts),
                "--policy",
                str(ckpt),
                "--out",
                str(tmp_path / "o.jsonl"),
                "--reward",
                str(scores),
            ],
            [
                "train",
                "--out",
                str(tmp_path / "run"),
                "--set",
                "objective=sft",
                "--set",
                f"data.path={prompts}",
                "--set",
                f"data.chat_template={bad}",
                "--set",
                "model=griffin-tiny",
            ],
            ["train", bad, "--out", str(tmp_path / "run")],
            ["sweep", bad, "--out", str(tmp_path / "sweep"), "--dry-run"],
            ["scaling", "fit", bad],
            ["info", bad],
        ):
            t0 = time.perf_counter()
            code = main(argv)
            err = capsys.readouterr().err.strip()
            assert code == 2 and len(err.splitlines()) == 1, (argv, err)
            assert "regular file" in err or "not found" in err or "unsupported" in err, (argv, err)
            assert time.perf_counter() - t0 < 30
            assert not (tmp_path / "run").exists()
        pytest.importorskip("fastapi")
        assert main(["serve", str(ckpt), "--chat-template", bad, "--port", "1"]) == 2
        assert "a chat template" in capsys.readouterr().err
        with pytest.raises(SystemExit, match="an API key file .* is not a regular file"):
            main(["serve", str(ckpt), "--api-key-file", bad, "--port", "1"])
