"""The OpenAI-compatible server: completions equal generate, batches, streaming framing, echo and
logprobs as lm-eval reads them, every bad request, 429, API keys, metrics, engine errors, and a
bounded loopback soak test with random disconnects."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from griffon import Griffon
from griffon.config import ModelConfig
from griffon.data.tokenizers import ByteTokenizer
from griffon.decode.generate import generate
from griffon.engine import Engine, SamplingParams
from griffon.engine.limits import Limits

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from griffon.serve.server import BackgroundServer, create_app  # noqa: E402

CHUNK = 16
CONFIGS = {
    "griffin": dict(attention_window=8),
    "mqa": dict(block_pattern=("attention",), attention_window=None, max_seq_len=64),
}


def _model(name="griffin") -> Griffon:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=256, width=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_width=48, **CONFIGS[name]
    )
    return Griffon(cfg).double().eval()  # float64: batched and single-row decoding agree to ~1e-16


class Client(TestClient):
    """A test client that, once in, waits until the app is ready (warmed up)."""

    def __enter__(self):
        client = super().__enter__()
        assert self.app.state.server.ready.wait(60)
        return client


def _client(model=None, api_key=None, limits=None, **engine_kwargs) -> Client:
    engine = Engine(
        model or _model(), ByteTokenizer(), prefill_chunk=CHUNK, step="model", limits=limits, **engine_kwargs
    )
    return Client(create_app(engine, "tiny", api_key=api_key))


def _reference(model, prompt: list[int], max_tokens: int, **kw) -> list[int]:
    return generate(model, [prompt], max_tokens, prefill_chunk=CHUNK, step="model", **kw)[0]


def test_completions_equal_generate_for_strings_ids_and_batches():
    model = _model()
    tok = ByteTokenizer()
    with _client(model) as client:
        body = {"model": "tiny", "prompt": ["ROMEO:", "To be"], "max_tokens": 7, "temperature": 0.8, "seed": 5}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "text_completion" and [c["index"] for c in out["choices"]] == [0, 1]
        for choice, prompt in zip(out["choices"], body["prompt"], strict=True):
            want = _reference(model, tok.encode(prompt), 7, temperature=0.8, seed=5)
            assert choice["text"] == tok.decode(want) and choice["finish_reason"] == "length"
        assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": 14, "total_tokens": 25}
        ids = [[1, 2, 3], [9]]
        r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 3, "temperature": 0.0})
        for choice, prompt in zip(r.json()["choices"], ids, strict=True):
            assert choice["text"] == tok.decode(_reference(model, prompt, 3, temperature=0.0))


def _events(response) -> list:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_streaming_framing_and_text_equal_the_plain_answer():
    with _client() as client:
        body = {"prompt": ["abc", "xyz"], "max_tokens": 9, "temperature": 0.0}
        plain = client.post("/v1/completions", json=body).json()
        streamed = body | {"stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/completions", json=streamed) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = _events(r)
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    events = events[:-1]
    for i, choice in enumerate(plain["choices"]):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])


def test_echo_and_logprobs_score_the_prompt_as_lm_eval_reads_them():
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model = _model()
    prompt = [10, 20, 30, 40, 50]
    with _client(model) as client:
        body = {"prompt": [prompt], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
        out = client.post("/v1/completions", json=body).json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt]))
    want = logits[0].log_softmax(-1)
    for t in range(1, len(prompt)):
        assert lp["token_logprobs"][t] == pytest.approx(float(want[t - 1, prompt[t]]), abs=1e-9)
    ctxlen = 2  # lm-eval scores the continuation prompt[2:] given prompt[:2]
    [(total, greedy)] = LocalCompletionsAPI.parse_logprobs(out, ctxlens=[ctxlen])
    assert total == pytest.approx(sum(float(want[t - 1, prompt[t]]) for t in range(ctxlen, len(prompt))), abs=1e-9)
    assert greedy == all(int(want[t - 1].argmax()) == prompt[t] for t in range(ctxlen, len(prompt)))


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "invalid JSON"),
        ({"prompt": "a", "colour": "red"}, 400, "unknown field 'colour'"),
        ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"prompt": "a", "top_p": 0}, 400, "top_p"),
        ({"prompt": "a", "logprobs": 50}, 400, "logprobs"),
        ({"prompt": "a", "n": 0}, 400, "n"),
        ({"prompt": "a", "presence_penalty": 2.5}, 400, "presence_penalty"),
        ({"prompt": "a", "suffix": "b"}, 400, "suffix is not supported"),
        ({"prompt": "a", "n": 3, "best_of": 2}, 400, "best_of (2) must be at least n (3)"),
        ({"prompt": "a", "best_of": 2, "stream": True}, 400, "best_of > n cannot be streamed"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias keys are token ids"),
        ({"prompt": "a", "logit_bias": {"300": 1}}, 400, "logit_bias: token ids must lie in [0, 256)"),
        ({"prompt": "a", "logit_bias": {"3": 101}}, 400, "logit_bias"),
        ({"prompt": "a", "stop_token_ids": [256]}, 400, "stop_token_ids: token ids must lie in [0, 256)"),
        ({"prompt": "a", "min_p": 1.5}, 400, "min_p"),
        ({"prompt": "a", "top_k": -5}, 400, "top_k"),
        ({"prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"prompt": "a", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens must lie in [0, max_tokens=2]"),
        ({"prompt": "", "max_tokens": 2}, 400, "prompt: String should have at least 1 character"),
        ({"prompt": [[1], []], "max_tokens": 2}, 400, "prompt.1: List should have at least 1 item"),
        ({"prompt": [300]}, 400, "token ids must lie in"),
        ({"prompt": "a", "max_tokens": 0}, 400, "only with echo"),
        ({"prompt": "x" * 60, "max_tokens": 10}, 400, "exceeds the model's limit of 64"),
        ({"prompt": "a", "model": "gpt-4"}, 404, "does not exist"),
    ],
)
def test_bad_requests_get_one_clear_4xx(body, status, message):
    with _client(_model("mqa")) as client:
        if isinstance(body, bytes):
            r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = client.post("/v1/completions", json=body)
        assert r.status_code == status, r.text
        assert message in r.json()["error"]["message"]
        assert client.get("/health").json()["status"] == "ok"  # the server carries on


def test_full_queue_answers_429_with_retry_after():
    with _client(max_batch=1, max_queue=1) as client:
        server = client.app.state.server
        engine = server.client
        held = [engine.submit([1, 2], SamplingParams(max_tokens=100_000))]  # takes the one slot ...
        engine.wake()
        while not held[0].tokens:
            threading.Event().wait(0.01)
        held.append(engine.submit([1, 2], SamplingParams(max_tokens=1)))  # ... and this the queue
        r = client.post("/v1/completions", json={"prompt": "a"})
        for req in held:
            engine.cancel(req.id)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "queue is full" in r.json()["error"]["message"]


def test_a_batch_larger_than_the_queue_is_refused_once():
    with _client(max_queue=3) as client:
        r = client.post("/v1/completions", json={"prompt": ["a", "b", "c", "d"], "max_tokens": 1})
        assert r.status_code == 400 and "max_queue=3" in r.json()["error"]["message"]
        assert 'griffon_rejected_requests_total{reason="invalid"} 1' in client.get("/metrics").text


def test_api_key():
    engine = Engine(_model(), ByteTokenizer(), step="model")
    with Client(create_app(engine, "tiny", api_key="s3cret")) as client:
        body = {"prompt": "a", "max_tokens": 1}
        assert client.post("/v1/completions", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.post("/v1/completions", json=body, headers=wrong).status_code == 401
        # the key is checked before the body is read: a bad body without the key is a 401, not a 400
        bad = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/completions", json=body, headers=right).status_code == 200
        assert client.get("/v1/models", headers=right).json()["data"][0]["id"] == "tiny"
        assert client.get("/health").status_code == 200  # health and metrics stay open
        for path in ("/docs", "/redoc", "/openapi.json"):  # the schema and docs do not
            assert client.get(path).status_code == 404, path
    with _client() as client:  # without a key they are there
        assert client.get("/openapi.json").status_code == 200


def test_metrics_and_models():
    with _client() as client:
        client.post("/v1/completions", json={"prompt": "a" * 40, "max_tokens": 3})
        client.post("/v1/completions", json={"prompt": "a" * 40, "max_tokens": 3})  # a prefix-cache hit
        text = client.get("/metrics").text
    for name in ("griffon_queue_length 0", "griffon_running_requests 0", "griffon_generation_tokens_total 6",
                 "griffon_prefix_cache_hit_rate 0.5000", 'griffon_requests_total{reason="length"} 2',
                 "griffon_time_to_first_token_seconds_count 2", 'griffon_time_per_output_token_seconds_bucket{le="+Inf"} 2'):  # fmt: skip
        assert name in text, name


def test_an_engine_error_fails_its_request_not_the_server(monkeypatch):
    engine = Engine(_model(), ByteTokenizer(), step="model")
    real = engine._sample

    def broken(req, logits):
        if req.params.seed == 666:
            raise RuntimeError("boom")
        return real(req, logits)

    monkeypatch.setattr(engine, "_sample", broken)
    with Client(create_app(engine, "tiny")) as client:
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 4, "seed": 666})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 4}).status_code == 200
        health = client.get("/health").json()
        assert health == {"status": "ok", "engine_errors": 1}  # counted; the text stays in the log


def test_a_tiny_temperature_is_greedy_and_harms_no_batch_mate():
    """temperature 2e-39 once made NaN probabilities that failed every request in the batch."""
    model = _model()
    tok = ByteTokenizer()
    engine = Engine(model, tok, prefill_chunk=CHUNK, step="model")
    long = {"prompt": "To be", "max_tokens": 300, "temperature": 0.8, "seed": 1, "stream": True}
    with BackgroundServer(create_app(engine, "tiny")) as url, httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=long) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)  # the long request is running ...
            tiny = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 5, "temperature": 2e-39})
            text = json.loads(first[6:])["choices"][0]["text"]
            text += "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines if x.startswith("data: {"))
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["choices"][0]["text"] == tok.decode(_reference(model, tok.encode("ab"), 5, temperature=0.0))
        assert text == tok.decode(_reference(model, tok.encode("To be"), 300, temperature=0.8, seed=1))
        for seed in (2**64, -(2**63) - 1):
            r = http.post("/v1/completions", json={"prompt": "ab", "seed": seed})
            assert r.status_code == 400 and "seed" in r.json()["error"]["message"]
        assert http.get("/health").json()["engine_errors"] == 0


def test_limits_answer_400_or_413_naming_the_limit():
    limits = Limits(max_prompt_tokens=20, max_tokens=8, max_logprob_entries=40)
    engine = Engine(_model(), ByteTokenizer(), prefill_chunk=CHUNK, step="model", limits=limits)
    with Client(create_app(engine, "tiny", max_body_bytes=1000)) as client:
        for body, message in [
            ({"prompt": "x" * 21}, "the prompt has 21 tokens; this server's limit is max_prompt_tokens=20"),
            ({"prompt": "x", "max_tokens": 9}, "max_tokens is 9; this server's limit is max_tokens=8"),
            ({"prompt": "x" * 20, "max_tokens": 0, "echo": True, "logprobs": 2}, "asks for 60 log-probabilities"),
        ]:
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        big = json.dumps({"prompt": "x", "user": "u" * 1000}).encode()
        r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "max_body_bytes=1000" in r.json()["error"]["message"]
        chunked = client.post(  # no content-length: counted as it arrives
            "/v1/completions", content=iter([big[:500], big[500:]]), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413 and "max_body_bytes=1000" in chunked.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "x" * 20, "max_tokens": 8}).status_code == 200
        metrics = client.get("/metrics").text
    assert 'griffon_rejected_requests_total{reason="invalid"} 3' in metrics
    assert 'griffon_rejected_requests_total{reason="too_large"} 2' in metrics


def test_streamed_echo_and_logprobs_concatenate_to_the_plain_answer():
    body = {"prompt": ["Hello", "ab"], "max_tokens": 6, "temperature": 0.0, "echo": True, "logprobs": 2}
    with _client() as client:
        plain = client.post("/v1/completions", json=body).json()
        with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            events = _events(r)
    for i, choice in enumerate(plain["choices"]):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert sum((c["logprobs"][key] for c in mine), []) == choice["logprobs"][key], key
        assert choice["logprobs"]["text_offset"] == list(range(len(choice["text"])))  # bytes: one char each


def test_text_offsets_index_the_returned_text_where_byte_tokens_split_characters():
    """Byte tokens of a multi-byte character: each offset is where its entry's text starts in the
    answer (a token that completes no character adds nothing), whole and streamed alike."""
    body = {"prompt": "é!ü", "max_tokens": 0, "echo": True, "logprobs": 1}
    with _client() as client:
        plain = client.post("/v1/completions", json=body).json()["choices"][0]
        with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            events = _events(r)
    assert plain["text"] == "é!ü"
    assert plain["logprobs"]["text_offset"] == [0, 0, 1, 2, 2]  # c3 a9 21 c3 bc
    streamed = sum((e["choices"][0]["logprobs"]["text_offset"] for e in events if e["choices"][0]["logprobs"]), [])
    assert streamed == plain["logprobs"]["text_offset"]


def test_health_is_503_until_warmed_up(monkeypatch):
    engine = Engine(_model(), ByteTokenizer(), step="model")
    release = threading.Event()
    real = engine.warm_up
    monkeypatch.setattr(engine, "warm_up", lambda: (release.wait(30), real())[1])
    with TestClient(create_app(engine, "tiny")) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "starting"}
        assert client.post("/v1/completions", json={"prompt": "a"}).status_code == 503
        release.set()
        assert client.app.state.server.ready.wait(30)
        assert client.get("/health").json()["status"] == "ok"
        assert client.post("/v1/completions", json={"prompt": "a"}).status_code == 200


def test_a_client_that_gives_up_is_cancelled_when_not_streaming():
    engine = Engine(_model(), ByteTokenizer(), prefill_chunk=CHUNK, step="model")
    with BackgroundServer(create_app(engine, "tiny")) as url:
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=0.5) as http:
            http.post("/v1/completions", json={"prompt": "a", "max_tokens": 4000, "ignore_eos": True})
        for _ in range(100):  # polled every 0.25 s, while tokens keep coming
            if engine.metrics.requests.get("cancelled"):
                break
            threading.Event().wait(0.05)
        assert engine.metrics.requests == {"cancelled": 1}
        assert engine.metrics.generation_tokens < 4000


def test_soak_with_random_disconnects_loses_and_mixes_nothing():
    """40 concurrent clients on loopback, a third of which hang up mid-stream: every finished
    answer equals generate's for its own prompt and seed, and every slot is freed."""
    model = _model()
    tok = ByteTokenizer()
    engine = Engine(model, tok, max_batch=6, prefill_chunk=CHUNK, step_tokens=CHUNK, step="model")
    rng = random.Random(0)
    # (prompt, max_tokens, hangs up): those that hang up would run for 400 tokens unless cancelled
    jobs = [("".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(1, 40))),
             400 if i % 3 == 0 else rng.randrange(1, 12), i % 3 == 0) for i in range(40)]  # fmt: skip
    answers: dict[int, str] = {}

    def client_job(i: int, url: str) -> None:
        prompt, max_tokens, hang_up = jobs[i]
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.9, "seed": i, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
            text = ""
            for line in r.iter_lines():
                if hang_up and line:
                    return  # close the connection after the first event
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
            answers[i] = text

    with BackgroundServer(create_app(engine, "tiny")) as url:
        threads = [threading.Thread(target=client_job, args=(i, url)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        deadline = 200
        while (engine.has_work()) and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
    assert not engine.has_work() and engine.runner.batch is None
    assert engine.metrics.requests == {"cancelled": 14, "length": 26}
    for i, (prompt, max_tokens, hang_up) in enumerate(jobs):
        if hang_up:
            continue
        want = _reference(model, tok.encode(prompt), max_tokens, temperature=0.9, seed=i)
        assert answers[i] == tok.decode(want), i


def test_lm_eval_local_completions_scores_through_the_server(tmp_path):
    """lm-evaluation-harness's own ``local-completions`` model, pointed at the server, gives every
    request the loglikelihood griffon's lm-eval model gives it (same checkpoint, fp32)."""
    pytest.importorskip("lm_eval")
    import lm_eval
    import lm_eval.models  # noqa: F401 - registers lm-eval's own models
    from lm_eval.tasks import TaskManager

    from griffon import get_preset, save_pretrained
    from griffon.cli import main
    from griffon.eval.harness import TASKS_DIR, GriffonLM

    torch.manual_seed(0)
    model = Griffon(get_preset("griffin-tiny")).eval()
    save_pretrained(model, tmp_path / "ckpt")
    ByteTokenizer().save(tmp_path / "ckpt")
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0  # its tokenizer, for lm-eval
    tasks, manager = ["griffon_next_line"], TaskManager(include_path=str(TASKS_DIR))
    ours = lm_eval.simple_evaluate(model=GriffonLM(pretrained=str(tmp_path / "ckpt"), batch_size=3), tasks=tasks,
                                   task_manager=manager, limit=6, log_samples=True)  # fmt: skip
    engine = Engine(model, ByteTokenizer(), prefill_chunk=CHUNK)
    with BackgroundServer(create_app(engine, "tiny")) as url:
        args = (f"model=tiny,base_url={url}/v1/completions,tokenizer={tmp_path / 'hf'},tokenizer_backend=huggingface,"
                "tokenized_requests=True,num_concurrent=2,max_retries=1")  # fmt: skip
        served = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=tasks,
                                         task_manager=manager, limit=6, log_samples=True)  # fmt: skip
    pairs = [(a, b) for x, y in zip(ours["samples"][tasks[0]], served["samples"][tasks[0]], strict=True)
             for a, b in zip(x["resps"], y["resps"], strict=True)]  # fmt: skip
    assert len(pairs) >= 6
    for (mine,), (theirs,) in pairs:
        assert theirs[0] == pytest.approx(mine[0], abs=1e-4)
        assert theirs[1] == mine[1]


def test_griffon_serve_command_builds_the_app(tmp_path, monkeypatch, capsys):
    """``griffon serve RUN`` loads the checkpoint and its tokenizer and hands uvicorn the app; the
    key comes from a file, the environment or (with a warning) the command line."""
    from griffon import get_preset, save_pretrained
    from griffon.cli import main
    from griffon.serve import server

    save_pretrained(Griffon(get_preset("griffin-tiny")), tmp_path / "ckpt")
    ByteTokenizer().save(tmp_path / "ckpt")
    seen = {}
    monkeypatch.setattr(
        server, "run", lambda app, host, port, shutdown_timeout, connections: seen.update(app=app, port=port)
    )
    (tmp_path / "key").write_text("from-a-file\n")
    argv = ["serve", str(tmp_path / "ckpt"), "--port", "8123", "--max-batch", "2", "--max-tokens", "5"]
    assert main([*argv, "--api-key-file", str(tmp_path / "key")]) == 0
    assert seen["port"] == 8123
    with Client(seen["app"]) as client:
        ok = {"Authorization": "Bearer from-a-file"}
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3}, headers=ok)
        assert r.status_code == 200 and r.json()["model"] == "ckpt"
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 6}, headers=ok)
        assert r.status_code == 400 and "max_tokens=5" in r.json()["error"]["message"]
    argv += ["--engine", "thread"]  # the engine's place does not matter below (and no process is left behind)
    monkeypatch.setenv("GRIFFON_API_KEY", "from-the-environment")
    assert main(argv) == 0
    assert seen["app"].state.server.api_key == "from-the-environment"
    monkeypatch.delenv("GRIFFON_API_KEY")
    capsys.readouterr()
    assert main([*argv, "--api-key", "k"]) == 0
    assert seen["app"].state.server.api_key == "k" and "process list" in capsys.readouterr().err


def test_bench_serve_runs_on_loopback(tmp_path):
    from griffon.bench.serve import _check_loopback
    from griffon.cli import main

    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--preset", "griffin-tiny", "--requests", "4", "--rates", "8,inf", "--prompt-len", "4:8",
            "--output-len", "2:4", "--json", str(out), "--png", str(tmp_path / "serve.png")]  # fmt: skip
    assert main(argv) == 0
    load = json.loads(out.read_text())["load"]
    assert [r["completed"] for r in load] == [4, 4] and all(r["ttft_s"]["p50"] > 0 for r in load)
    assert (tmp_path / "serve.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="loopback"):
        _check_loopback("http://example.com:8000")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pins the load generator and the server apart")
def test_bench_serve_offline_reports_cpu_shares_with_the_client_pinned(tmp_path):
    from griffon.cli import main

    out = tmp_path / "offline.json"
    before = os.sched_getaffinity(0)
    client = sorted(before)[-1]
    argv = ["bench", "serve", "--preset", "griffin-tiny", "--experiments", "offline", "--repeats", "1",
            "--client-cpus", str(client), "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    offline = json.loads(out.read_text())["offline"]
    assert offline["client_cpus"] == [client] and client not in offline["server_cpus"]
    for engine in ("process", "thread"):
        for kind in ("whole", "streamed"):
            run = offline["runs"][f"{engine} {kind}"][0]
            assert run["completed"] == 16 and 0 < run["client_cpu_share"] and 0 < run["server_cpu_share"]
            assert offline["server_over_offline"][f"{engine} {kind}"] == run["over_offline"] > 0
    assert os.sched_getaffinity(0) == before  # restored


def _serve_process(tmp_path, *flags: str, stderr=subprocess.DEVNULL, env: dict | None = None):
    """Start ``griffon serve`` on a tiny Griffin in a process of its own; return it, its URL and
    the /health answers seen until it was ready."""
    import socket

    from griffon import get_preset, save_pretrained

    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        torch.manual_seed(0)
        save_pretrained(Griffon(get_preset("griffin-tiny")), ckpt)
        ByteTokenizer().save(ckpt)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "griffon.cli", "serve", str(ckpt), "--port", str(port), *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, env={**os.environ, **(env or {})}, text=True)
    url, seen = f"http://127.0.0.1:{port}", []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            seen.append((r.status_code, r.json()))
            if r.status_code == 200:
                return proc, url, seen
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"griffon serve did not become ready (exit code {proc.poll()}): {seen[-3:]}")


def test_ready_means_warm_and_an_unwritable_log_stops_nothing(tmp_path):
    """With empty kernel caches and stderr on a full device: /health answers 503 "starting" until
    the engine is warm, then the first completion takes no more than max(1 s, 3x the tenth); the
    server serves on, and says once on stdout that its log cannot be written."""
    caches = {"NUMBA_CACHE_DIR": str(tmp_path / "numba"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    with open("/dev/full", "w") as full:
        proc, url, seen = _serve_process(tmp_path, "--max-batch", "4", stderr=full, env=caches)
    try:
        assert all(answer == (503, {"status": "starting"}) for answer in seen[:-1]), seen
        times = []
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(10):
                t0 = time.perf_counter()
                r = http.post("/v1/completions", json={"prompt": f"ROMEO {i}:", "max_tokens": 16, "seed": i})
                times.append(time.perf_counter() - t0)
                assert r.status_code == 200
        assert times[0] <= max(1.0, 3 * times[9]), times
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal once it has shut down
    assert out.count("the log (stderr) cannot be written") == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_running_streams_and_the_server_in_bounded_time(tmp_path, sig):
    proc, url, _ = _serve_process(tmp_path, "--max-tokens", "10000000", "--shutdown-timeout", "1")
    body = {"prompt": "a", "max_tokens": 10_000_000, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")  # it runs
            t0 = time.monotonic()
            proc.send_signal(sig)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
        proc.wait(timeout=20)
        # exit codes: 0, or the signal's own (uvicorn raises it again once shut down; 130 for SIGINT)
        assert time.monotonic() - t0 < 10 and proc.returncode in (0, -sig, 128 + sig)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_fuzzing_from_the_openapi_schema_finds_no_5xx_hang_or_nonconforming_answer():
    """schemathesis, driven by the server's own schema: 300 schema-following and 300 schema-breaking
    requests per operation (experiments/fuzz_server.py; a longer run's result is in docs/serving.md)."""
    pytest.importorskip("schemathesis")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "experiments" / "fuzz_server.py"
    spec = importlib.util.spec_from_file_location("fuzz_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.tiny_app()
    with BackgroundServer(app) as url:
        report = module.fuzz(app, url, examples=300, timeout=30)
    completions = [v for k, v in report.items() if k.startswith("POST /v1/completions")]
    assert len(completions) == 2 and all(v["requests"] >= 200 for v in completions), report
    assert all("200" in v["statuses"] for k, v in report.items() if "(positive)" in k), report


def test_n_and_best_of_choose_by_mean_logprob_and_count_every_choice():
    """``n`` choices per prompt, choice i seeded ``seed + i`` (each equal to generate with that
    seed); ``best_of`` keeps the ``n`` with the highest mean log-probability per token, recomputed
    here from the model's own forward; usage counts the prompt once and every choice's tokens."""
    model = _model()
    tok = ByteTokenizer()
    prompt = tok.encode("ROMEO:")
    with _client(model) as client:
        r = client.post("/v1/completions", json={"prompt": ["ROMEO:", "To"], "max_tokens": 5, "n": 3, "seed": 7})
        out = r.json()
        assert [c["index"] for c in out["choices"]] == list(range(6))
        for i, choice in enumerate(out["choices"][:3]):
            assert choice["text"] == tok.decode(_reference(model, prompt, 5, seed=7 + i))
        assert out["usage"] == {"prompt_tokens": 8, "completion_tokens": 30, "total_tokens": 38}
        best = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5, "n": 2, "best_of": 4,
                                                     "seed": 7}).json()  # fmt: skip
    candidates = [_reference(model, prompt, 5, seed=7 + i) for i in range(4)]

    def mean_logprob(tokens):
        with torch.no_grad():
            logits, _ = model(torch.tensor([prompt + tokens]))
        logp = logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        return float(logp.gather(-1, torch.tensor(tokens)[:, None]).mean())

    ranked = sorted(candidates, key=mean_logprob, reverse=True)
    assert [c["text"] for c in best["choices"]] == [tok.decode(t) for t in ranked[:2]]
    assert best["usage"]["completion_tokens"] == 20  # all four were generated


def test_penalties_and_biases_against_a_hand_computed_greedy_walk():
    """Greedy decoding with a repetition, frequency and presence penalty and a logit bias gives
    the tokens of a walk that applies them by hand to the model's logits at each step."""
    model = _model()
    tok = ByteTokenizer()
    prompt = tok.encode("abab")
    rep, freq, pres, bias = 1.5, 0.7, 0.4, {ord("z"): 2.0, ord("a"): -1.0}
    out: list[int] = []
    for _ in range(8):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out]))[0][0, -1].clone()
        for t, b in bias.items():
            logits[t] += b
        for t in set(prompt) | set(out):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):
            logits[t] -= freq * out.count(t) + pres
        out.append(int(logits.argmax()))
    body = {"prompt": "abab", "max_tokens": 8, "temperature": 0.0, "repetition_penalty": rep, "frequency_penalty": freq,
            "presence_penalty": pres, "logit_bias": {str(t): b for t, b in bias.items()}}  # fmt: skip
    with _client(model) as client:
        text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        plain = client.post("/v1/completions", json={"prompt": "abab", "max_tokens": 8, "temperature": 0.0}).json()
    assert text == tok.decode(out) and plain["choices"][0]["text"] != text  # the adjustments mattered


def test_min_tokens_holds_back_eos_stop_tokens_and_stop_strings():
    model = _model()
    with _client(model) as client:
        free = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 8, "temperature": 0.0}).json()
        text = free["choices"][0]["text"]
        first = ord(text[0])
        stopped = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 8, "temperature": 0.0,
                                                        "stop_token_ids": [first]}).json()  # fmt: skip
        held = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 8, "temperature": 0.0,
                                                     "stop_token_ids": [first], "min_tokens": 3}).json()  # fmt: skip
        # a sampled walk whose first two tokens are ASCII and do not recur, so that they make a stop string
        for seed in range(20):
            walk = {"prompt": "ab", "max_tokens": 8, "temperature": 1.0, "seed": seed}
            sampled = client.post("/v1/completions", json=walk).json()["choices"][0]["text"]
            if sampled[:2].isascii() and sampled[:2] not in sampled[1:]:
                break
        string = client.post("/v1/completions", json={**walk, "stop": [sampled[:2]], "min_tokens": 3}).json()
        cut = client.post("/v1/completions", json={**walk, "stop": [sampled[:2]]}).json()
    # a stop token that is not EOS keeps its text, as vLLM keeps non-special stop tokens
    assert stopped["choices"][0]["text"] == text[0] and stopped["choices"][0]["finish_reason"] == "stop"
    # the stop token cannot be drawn before 3 tokens: the walk changes, and runs on past them
    assert len(held["choices"][0]["text"]) >= 3 and ord(held["choices"][0]["text"][0]) != first
    # a stop string wholly inside the first 3 tokens never stops the request
    assert string["choices"][0]["text"] == sampled and string["choices"][0]["finish_reason"] == "length"
    assert cut["choices"][0]["text"] == "" and cut["choices"][0]["finish_reason"] == "stop"


def test_limits_count_every_choice():
    with _client(limits=Limits(max_tokens=10)) as client:
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 4, "n": 3})
        assert r.status_code == 400 and "3 choices x max_tokens 4; this server's limit is max_tokens=10" in r.text
        assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 5, "n": 2}).status_code == 200


def test_top_logprobs_hold_the_sampled_token_for_the_openai_client():
    """With the official client: ``logprobs=0`` gives one entry per token, the token taken; with
    ``logprobs=2`` up to three, the token taken among them."""
    openai = pytest.importorskip("openai")
    engine = Engine(_model(), ByteTokenizer(), prefill_chunk=CHUNK, step="model")
    with BackgroundServer(create_app(engine, "tiny")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for k in (0, 2):
            # ASCII tokens only: the byte tokens above 127 all decode to the same replacement character
            ascii_only = {str(t): -100 for t in range(128, 256)}
            out = client.completions.create(
                model="tiny", prompt="To be", max_tokens=6, logprobs=k, seed=3, logit_bias=ascii_only
            )
            lp = out.choices[0].logprobs
            assert len(lp.tokens) == len(lp.top_logprobs) == 6
            for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
                assert top[token] == pytest.approx(value) and 1 <= len(top) <= k + 1
                assert k == 0 or max(top.values()) >= value


def test_heavy_bodies_are_refused_cheaply_and_the_loop_stays_responsive():
    """A body of 1.5 million one-character prompts is refused by the schema's bound on prompts,
    before anything is tokenised, in well under a second; three at once leave /health quick."""
    big = json.dumps({"prompt": ["a"] * 1_500_000}).encode()
    with BackgroundServer(create_app(Engine(_model(), ByteTokenizer(), step="model"), "tiny", warm_up=False)) as url:
        answers = []

        def post() -> None:
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/completions", content=big, headers={"content-type": "application/json"},
                           timeout=60)  # fmt: skip
            answers.append((r.status_code, r.json()["error"]["message"], time.monotonic() - t0))

        threads = [threading.Thread(target=post) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        health_seconds = time.monotonic() - t0
        for t in threads:
            t.join(60)
        chat = {"messages": [{"role": "user", "content": "a"}] * 2000, "max_tokens": 1}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert [a[0] for a in answers] == [400] * 3 and all("prompt" in a[1] for a in answers), answers
    assert max(a[2] for a in answers) < 3 and health_seconds < 2, (answers, health_seconds)


def test_half_sent_bodies_time_out_and_connections_are_bounded():
    import socket

    app = create_app(Engine(_model(), ByteTokenizer(), step="model"), "tiny", warm_up=False, body_timeout=0.5)
    with BackgroundServer(app, max_connections=3) as url:
        host, port = url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n" + b'{"prompt": ')  # fmt: skip
        slow.settimeout(10)
        t0 = time.monotonic()
        reply = slow.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout=0.5 s" in reply, reply
        assert time.monotonic() - t0 < 5
        slow.close()
        held = [socket.create_connection((host, int(port))) for _ in range(3)]  # idle, open
        time.sleep(0.2)
        refused = httpx.get(f"{url}/health", timeout=10)
        assert refused.status_code == 503
        for s in held:
            s.close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_the_api_takes_the_sampling_settings_ranges_from_sampling_params():
    """Declared once (SamplingParams.bounds), the ranges reach both APIs' schemas: the edges of each
    are taken, a step past them refused with a 400 naming the setting."""
    import dataclasses

    from griffon.serve.schema import ChatCompletionRequest, CompletionRequest

    names = [f.name for f in dataclasses.fields(SamplingParams) if "bounds" in f.metadata]
    assert "temperature" in names and "repetition_penalty" in names
    for model, renamed in ((CompletionRequest, {}), (ChatCompletionRequest, {"logprobs": "top_logprobs"})):
        props = model.model_json_schema()["properties"]
        for name in names:
            field = props[renamed.get(name, name)]
            field = field.get("anyOf", [field])[0]
            if name == "logit_bias":
                field = field["additionalProperties"]
            keys = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum"}
            assert {keys[k]: v for k, v in SamplingParams.bounds(name).schema().items()} == {
                k: field[k] for k in ("minimum", "exclusiveMinimum", "maximum") if k in field
            }, name
    with _client() as client:
        # temperature has no upper bound in SamplingParams: 2.5 (past OpenAI's 2) samples
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "temperature": 2.5, "seed": 0})
        assert r.status_code == 200, r.text
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}],
                                                       "max_tokens": 0})  # fmt: skip
        assert r.status_code == 400 and "only with echo" in r.json()["error"]["message"]


def test_a_request_is_validated_once(monkeypatch):
    """The server checks a request; neither the client nor the engine checks it again."""
    calls = []
    real = SamplingParams.validate
    monkeypatch.setattr(SamplingParams, "validate", lambda self: calls.append(self) or real(self))
    with _client() as client:
        calls.clear()  # the warm-up's
        r = client.post("/v1/completions", json={"prompt": ["ab", "cd", "ef"], "max_tokens": 2, "n": 2, "seed": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 6
    assert len(calls) == 3  # once a prompt, its choices counted together
