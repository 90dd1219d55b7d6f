"""The OpenAI-compatible server: completions equal generate, batches, streaming framing, echo and
logprobs as lm-eval reads them, every bad request, 429, API keys, metrics, engine errors, and a
bounded loopback soak test with random disconnects."""

import json
import random
import threading

import httpx
import pytest
import torch

from griffon import Griffon
from griffon.config import ModelConfig
from griffon.data.tokenizers import ByteTokenizer
from griffon.decode.generate import generate
from griffon.serve import Engine, SamplingParams

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
    engine = Engine(model or _model(), ByteTokenizer(), prefill_chunk=CHUNK, step="model", limits=limits, **engine_kwargs)
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
        ({"prompt": "a", "n": 2}, 400, "n"),
        ({"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"prompt": "", "max_tokens": 2}, 400, "prompt is empty"),
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
        engine = server.engine
        held = [engine.submit([1, 2], SamplingParams(max_tokens=100_000))]  # takes the one slot ...
        server.thread.wake()
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
        right = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/completions", json=body, headers=right).status_code == 200
        assert client.get("/v1/models", headers=right).json()["data"][0]["id"] == "tiny"
        assert client.get("/health").status_code == 200  # health and metrics stay open


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
    real = engine._decode
    calls = {"n": 0}

    def broken():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real()

    monkeypatch.setattr(engine, "_decode", broken)
    with TestClient(create_app(engine, "tiny")) as client:
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 4})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 4}).status_code == 200
        assert client.get("/health").json()["engine_errors"] == 1


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
    assert not engine.has_work() and engine._batch is None
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
    from griffon.harness import TASKS_DIR, GriffonLM

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


def test_griffon_serve_command_builds_the_app(tmp_path, monkeypatch):
    """``griffon serve RUN`` loads the checkpoint and its tokenizer and hands uvicorn the app."""
    import uvicorn

    from griffon import get_preset, save_pretrained
    from griffon.cli import main

    save_pretrained(Griffon(get_preset("griffin-tiny")), tmp_path / "ckpt")
    ByteTokenizer().save(tmp_path / "ckpt")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app, port=port))
    assert main(["serve", str(tmp_path / "ckpt"), "--port", "8123", "--api-key", "k", "--max-batch", "2"]) == 0
    assert seen["port"] == 8123
    with TestClient(seen["app"]) as client:
        r = client.post(
            "/v1/completions", json={"prompt": "ab", "max_tokens": 3}, headers={"Authorization": "Bearer k"}
        )
        assert r.status_code == 200 and r.json()["model"] == "ckpt"


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
