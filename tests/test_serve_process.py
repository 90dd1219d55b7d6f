"""The engine in its own process (griffon.engine.process): the server answers exactly as with
the engine on a thread (text, token ids, echo and logprobs, stop strings, best_of, streaming, chat),
admission, cancellation and metrics cross the pipe, a core that cannot start says why in one line,
and a core that dies fails its requests and the server says so."""

import functools
import json
import os
import signal
import time

import httpx
import pytest
import torch

from griffon import Griffon
from griffon.config import ModelConfig
from griffon.data.tokenizers import ByteTokenizer
from griffon.engine import Engine, QueueFull, SamplingParams
from griffon.engine.process import EngineProcess

pytest.importorskip("fastapi")
from griffon.serve.server import BackgroundServer, create_app  # noqa: E402

CHUNK = 16


def build(max_batch: int = 64, max_queue: int = 256, fail: bool = False) -> Engine:
    """The engine both servers run: a random-weight model in float64 (rows agree however batched)."""
    if fail:
        raise ValueError("no such model: /nowhere")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, width=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_width=48,
                      attention_window=8)  # fmt: skip
    model = Griffon(cfg).double().eval()
    return Engine(model, ByteTokenizer(), max_batch=max_batch, max_queue=max_queue, prefill_chunk=CHUNK, step="model")


def _process(**kw) -> EngineProcess:
    return EngineProcess(functools.partial(build, **kw), ByteTokenizer(), warm_up=False)


BODIES = [
    {"prompt": "ROMEO:", "max_tokens": 9, "temperature": 0.8, "seed": 5},
    {"prompt": ["To be", "or not"], "max_tokens": 5, "temperature": 0.0},
    {"prompt": [[1, 2, 3], [9]], "max_tokens": 4, "temperature": 1.0, "seed": 1},
    {"prompt": "Ay me", "max_tokens": 12, "temperature": 0.0, "echo": True, "logprobs": 3},
    {"prompt": "What", "max_tokens": 0, "echo": True, "logprobs": 2},
    {"prompt": "Hark", "max_tokens": 20, "temperature": 1.0, "seed": 3, "stop": ["e", "a"]},
    {"prompt": "O", "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 2, "best_of": 3},
    {"prompt": "Fie", "max_tokens": 7, "temperature": 0.7, "seed": 2, "stream": True, "logprobs": 1},
    {"prompt": "Nay", "max_tokens": 7, "temperature": 0.0, "stream": True, "echo": True,
     "stream_options": {"include_usage": True}},
]  # fmt: skip


def _merged(events: list[dict]) -> dict:
    """A stream's events joined per choice (how tokens group into events depends on timing)."""
    choices: dict[int, dict] = {}
    for event in events:
        for c in event["choices"]:
            into = choices.setdefault(c["index"], {"text": "", "logprobs": None, "finish_reason": None})
            into["text"] += c["text"]
            into["finish_reason"] = c["finish_reason"] or into["finish_reason"]
            if c["logprobs"] is not None:
                into["logprobs"] = into["logprobs"] or {k: [] for k in c["logprobs"]}
                for k, v in c["logprobs"].items():
                    into["logprobs"][k] += v
    return {"choices": choices, "usage": [e["usage"] for e in events if e.get("usage")]}


def _answers(url: str) -> list:
    """Each body's answer, one at a time, without ids and timestamps."""
    out = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for body in BODIES:
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            if body.get("stream"):
                events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
                assert events[-1] == "[DONE]"
                out.append(_merged([json.loads(e) for e in events[:-1]]))
            else:
                out.append({k: v for k, v in r.json().items() if k not in ("id", "created")})
        chat = {"messages": [{"role": "user", "content": "Speak"}], "max_tokens": 5, "temperature": 0.0}
        r = http.post("/v1/chat/completions", json=chat)
        out.append(r.status_code)
    return out


def test_the_engine_process_answers_exactly_as_the_engine_thread():
    with BackgroundServer(create_app(build(), "tiny", warm_up=False)) as url:
        on_thread = _answers(url)
    with BackgroundServer(create_app(_process(), "tiny")) as url:
        in_process = _answers(url)
        metrics = httpx.get(f"{url}/metrics").text
        health = httpx.get(f"{url}/health").json()
    assert in_process == on_thread
    assert on_thread[3]["choices"][0]["logprobs"]["top_logprobs"][1]  # echo with logprobs crossed the pipe
    assert len(on_thread[6]["choices"]) == 2 and on_thread[-1] in (200, 400)
    requests = 1 + 2 + 2 + 1 + 1 + 1 + 3 + 1 + 1 + (on_thread[-1] == 200)
    finished = sum(
        int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("griffon_requests_total{")
    )
    assert finished == requests and health == {"status": "ok", "engine_errors": 0}


def test_admission_cancellation_and_drain_cross_the_pipe():
    engine = _process(max_batch=1, max_queue=1)
    engine.start()
    try:
        long = SamplingParams(max_tokens=100_000, temperature=0.0)
        running = engine.submit([1, 2], long)
        waiting = engine.submit([3], long)
        with pytest.raises(QueueFull):
            engine.submit([4], long)
        with pytest.raises(ValueError, match="ids must lie in"):
            engine.submit([999], long)
        deadline = time.monotonic() + 60
        while not running.tokens and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.cancel(running.id)
        while not running.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.finish_reason == "cancelled" and len(running.tokens) > 0
        engine.drain(0.0)
        while not waiting.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting.finish_reason == "shutdown"
        time.sleep(0.6)  # the idle core's last metrics
        assert engine.metrics.requests == {"cancelled": 1, "shutdown": 1}
    finally:
        engine.stop()


def test_a_core_that_cannot_start_says_why_in_one_line():
    with pytest.raises(RuntimeError, match=r"^the engine process could not start: no such model: /nowhere$"):
        create_app(_process(fail=True), "tiny")


def test_a_core_that_dies_fails_its_requests_and_the_server_says_so():
    engine = _process()
    with BackgroundServer(create_app(engine, "tiny")) as url, httpx.Client(base_url=url, timeout=60) as http:
        body = {"prompt": "A", "max_tokens": 100_000, "temperature": 0.0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            events = r.iter_lines()
            assert next(e for e in events if e.startswith("data: "))  # it runs
            os.kill(engine.pid, signal.SIGKILL)
            rest = [e for e in events if e.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
        health = http.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "the engine process is gone (it was killed by signal SIGKILL)"
        r = http.post("/v1/completions", json={"prompt": "A", "max_tokens": 1})
        assert r.status_code == 503 and "the engine process is gone" in r.json()["error"]["message"]
        assert not os.path.exists(f"/proc/{engine.pid}")  # reaped: no zombie left


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_child(pid: int) -> int:
    """The engine process among the server's children (the spawned one; not the resource tracker)."""
    from pathlib import Path

    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError("no engine process")


def test_a_hung_engine_is_answered_within_the_deadline_and_health_turns_503(tmp_path):
    """A real ``griffon serve`` whose engine process is stopped (SIGSTOP, as a deadlock or a stuck
    native call leaves it): whole, streamed and chat requests get 504 within request_timeout plus
    the grace, ``/health`` and new requests 503 once the engine is silent past --stall-timeout
    with requests pending; resumed, it serves again."""
    import subprocess
    import sys
    import threading

    from griffon.checkpoint import save_pretrained
    from griffon.serve.server import DEADLINE_GRACE

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, width=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_width=48,
                      attention_window=8)  # fmt: skip
    save_pretrained(Griffon(cfg), tmp_path / "ckpt")
    ByteTokenizer().save(tmp_path / "ckpt")
    port = _port()
    server = subprocess.Popen(
        [sys.executable, "-m", "griffon.cli", "serve", str(tmp_path / "ckpt"), "--port", str(port),
         "--request-timeout", "1", "--stall-timeout", "2", "--max-batch", "4", "--step", "model"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.post("/v1/completions", json={"prompt": "A", "max_tokens": 2}).status_code == 200
        engine = _engine_child(server.pid)
        os.kill(engine, signal.SIGSTOP)
        bodies = {
            "whole": ("/v1/completions", {"prompt": "A", "max_tokens": 5}),
            "streamed": ("/v1/completions", {"prompt": "A", "max_tokens": 5, "stream": True}),
            "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}),
        }
        answers: dict = {}

        def ask(name: str) -> None:
            path, body = bodies[name]
            t0 = time.monotonic()
            r = httpx.post(url + path, json=body, timeout=60)
            answers[name] = (r.status_code, r.json()["error"]["message"], time.monotonic() - t0)

        threads = [threading.Thread(target=ask, args=(name,)) for name in bodies]
        for t in threads:
            t.start()
        time.sleep(2.5)  # past the stall timeout, requests pending
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and "the engine has not answered for" in health.json()["status"]
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "A", "max_tokens": 1}, timeout=5)
        assert refused.status_code == 503 and "has not answered" in refused.json()["error"]["message"]
        for t in threads:
            t.join(60)
        for name, (status, message, seconds) in answers.items():
            assert status == 504 and "request_timeout=1 s" in message, (name, status, message)
            assert seconds < 1 + DEADLINE_GRACE + 3, (name, seconds)
        assert len(answers) == 3
        os.kill(engine, signal.SIGCONT)  # the engine resumes: the cancelled requests end, it serves again
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "A", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    finally:
        try:
            os.kill(_engine_child(server.pid), signal.SIGCONT)
        except (AssertionError, OSError):
            pass
        server.terminate()
        server.wait(30)
