"""The serving engine against griffon.generate: same tokens whatever the arrival order and batch
composition; cancellation, timeouts, the prefix-state cache, stops, logprobs, bounds."""

import math
import random

import pytest
import torch

from griffon import Griffon
from griffon.config import ModelConfig, MoEConfig
from griffon.decode.generate import generate
from griffon.engine import Engine, QueueFull, SamplingParams

from memory import peak_traced_bytes

CHUNK = 8
BASE = dict(vocab_size=64, width=32, num_layers=3, num_heads=2, num_kv_heads=1, mlp_width=48)
CONFIGS = {
    "griffin": dict(attention_window=6),
    "hawk": dict(block_pattern=("recurrent",)),
    "mqa": dict(block_pattern=("attention",), attention_window=None, max_seq_len=96),
    # routing is per token, with no capacity: batching cannot change a token's experts
    "griffin-moe": dict(attention_window=6, moe=MoEConfig(num_experts=4, top_k=2, shared_experts=1, expert_width=24)),
}


def _model(name: str) -> Griffon:
    torch.manual_seed(0)
    # float64: batched and single-row matmuls then agree to ~1e-16, far below any sampling boundary
    return Griffon(ModelConfig(**{**BASE, **CONFIGS[name]})).double().eval()


def _reference(model: Griffon, prompt: list[int], p: SamplingParams) -> list[int]:
    out = generate(model, [prompt], p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                   seed=p.seed, prefill_chunk=CHUNK, step="model")  # fmt: skip
    return out[0]


def _requests(n: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(64) for _ in range(rng.choice([1, 5, CHUNK, 2 * CHUNK + 3, 30]))]
        params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=rng.choice([0.0, 0.7, 1.3]),
                                top_k=rng.choice([None, 5]), top_p=rng.choice([None, 0.9]), seed=100 + i)  # fmt: skip
        out.append((prompt, params))
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_engine_equals_generate_whatever_the_arrival_order(name):
    model = _model(name)
    requests = _requests(10, seed=1)
    want = [_reference(model, prompt, params) for prompt, params in requests]
    for order_seed in range(2):
        engine = Engine(model, max_batch=3, prefill_chunk=CHUNK, step_tokens=CHUNK, prefix_cache_bytes=0, step="model")
        order = list(range(len(requests)))
        random.Random(order_seed).shuffle(order)
        submitted = {}
        for k, i in enumerate(order):  # half arrive up front, the rest while others run
            submitted[i] = engine.submit(*requests[i])
            if k >= len(order) // 2:
                engine.step()
        engine.run_until_done()
        for i, req in submitted.items():
            assert req.tokens == want[i], (name, order_seed, i)
            assert req.finish_reason == "length"
        assert engine.runner.batch is None and not engine.scheduler.running


def test_cancel_frees_the_slot_and_timeouts_expire():
    model = _model("griffin")
    engine = Engine(model, max_batch=1, prefill_chunk=CHUNK, step="model")
    long = engine.submit([1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0))
    short = engine.submit([4, 5], SamplingParams(max_tokens=3, temperature=0.0))
    for _ in range(4):
        engine.step()
    assert (
        len(long.tokens) == 5 and not short.tokens
    )  # one slot, held by the first request (prefilled and decoded in step 1)
    assert engine.cancel(long.id)
    engine.run_until_done()
    assert long.finish_reason == "cancelled" and len(long.tokens) == 5
    assert short.tokens == _reference(model, [4, 5], SamplingParams(max_tokens=3, temperature=0.0))
    assert not engine.cancel(long.id)  # already finished
    late = engine.submit([7], SamplingParams(max_tokens=5), timeout=0.0)
    engine.run_until_done()
    assert late.finish_reason == "timeout" and not late.tokens


def test_prefix_cache_resumes_exactly():
    """Prompts sharing a prefix: later ones restore its state and prefill only the rest, with the
    same tokens as without the cache, including a prompt that is wholly cached."""
    model = _model("griffin")
    shared = list(range(3, 3 + 2 * CHUNK))
    prompts = [shared + [9, 1, 2], shared + [40], shared, list(shared[:CHUNK]) + [5]]
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=3)
    engine = Engine(model, prefill_chunk=CHUNK, step="model")
    first = engine.submit(prompts[0], params)
    engine.run_until_done()
    later = [engine.submit(p, params) for p in prompts[1:]]
    engine.run_until_done()
    assert first.cached_tokens == 0
    assert [r.cached_tokens for r in later] == [2 * CHUNK, 2 * CHUNK, CHUNK]
    for req, prompt in zip([first, *later], prompts, strict=True):
        assert req.tokens == _reference(model, prompt, params)
    assert engine.prefix_cache.hits == 3


def test_prefix_cache_is_bounded_by_bytes():
    model = _model("hawk")
    engine = Engine(model, prefill_chunk=CHUNK, step="model")
    engine.submit(list(range(CHUNK)), SamplingParams(max_tokens=1))
    engine.run_until_done()
    # room for four snapshots (one request's share is a quarter: one snapshot each)
    engine.prefix_cache.max_bytes = 4 * engine.prefix_cache.nbytes
    for start in range(1, 6):
        engine.submit(list(range(start, start + CHUNK)), SamplingParams(max_tokens=1))
        engine.run_until_done()
    assert len(engine.prefix_cache) == 4 and engine.prefix_cache.nbytes <= engine.prefix_cache.max_bytes
    assert engine.prefix_cache.lookup(list(range(1, 1 + CHUNK))) is None  # the oldest went first
    assert engine.prefix_cache.lookup(list(range(5, 5 + CHUNK))) is not None


def test_stop_tokens_eos_and_logprobs():
    model = _model("griffin")
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    tokens = _reference(model, [1, 2, 3], greedy)
    engine = Engine(model, prefill_chunk=CHUNK, step="model")
    stop_at = tokens[3]
    req = engine.submit([1, 2, 3], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_at,), logprobs=2))
    scored = engine.submit([1, 2, 3, 4], SamplingParams(max_tokens=0, echo=True, logprobs=1))
    engine.run_until_done()
    assert req.finish_reason == "stop" and req.tokens == tokens[: tokens.index(stop_at) + 1]
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 2, 3, 4]]))
    logp = logits[0].log_softmax(-1)
    entries = scored.logprob_entries(0, 4)
    assert scored.tokens == [] and len(entries) == 4 and entries[0] is None
    for t in range(3):
        entry = entries[t + 1]
        assert entry.logprob == pytest.approx(float(logp[t, [2, 3, 4][t]]), abs=1e-9)
        assert max(entry.top.values()) == pytest.approx(float(logp[t].max()), abs=1e-9)
    assert len(req.logprobs) == len(req.tokens) and all(len(lp.top) == 2 for lp in req.logprob_entries(0, 8))


def test_queue_bound_and_bad_requests():
    model = _model("mqa")
    engine = Engine(model, max_batch=1, max_queue=1, step="model")
    engine.submit([1], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull):
        engine.submit([1], SamplingParams(max_tokens=2))
    for prompt, params, message in [
        ([], SamplingParams(), "prompt is empty"),
        ([64], SamplingParams(), r"token ids must lie in \[0, 64\)"),
        ([1] * 90, SamplingParams(max_tokens=10), "exceeds the model's limit of 96"),
        ([1], SamplingParams(temperature=-1), "temperature"),
        ([1], SamplingParams(max_tokens=0), "only with echo"),
        ([1], SamplingParams(stop=("x",)), "stop strings need a tokenizer"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.check(prompt, params)


def test_a_failing_request_fails_alone(monkeypatch):
    """An error in one request's sampling, or a prefill forward that fails because of one request,
    fails that request only: its batch-mates finish with generate's tokens."""
    model = _model("griffin")
    requests = _requests(6, seed=3)
    want = [_reference(model, prompt, params) for prompt, params in requests]
    engine = Engine(model, max_batch=8, prefill_chunk=CHUNK, step_tokens=8 * CHUNK, prefix_cache_bytes=0, step="model")
    poison_sample, poison_prompt = SamplingParams(max_tokens=9, seed=666), [7] * 5
    real_sample, real_batch, real_forward = engine._sample, engine._sample_batch, engine._forward_chunk

    def poisoned(req):
        return req.params.seed == 666 and len(req.tokens) == 3

    def sample(req, logits):
        if poisoned(req):
            raise RuntimeError("boom in sampling")
        return real_sample(req, logits)

    def sample_batch(reqs, logits):  # the batched call fails for the whole batch, then each row is retried
        if any(poisoned(r) for r in reqs):
            raise RuntimeError("boom in sampling")
        return real_batch(reqs, logits)

    def forward(group):
        if any(r.prompt == poison_prompt for r in group):
            raise RuntimeError("boom in prefill")
        return real_forward(group)

    monkeypatch.setattr(engine, "_sample", sample)
    monkeypatch.setattr(engine, "_sample_batch", sample_batch)
    monkeypatch.setattr(engine, "_forward_chunk", forward)
    healthy = [engine.submit(*r) for r in requests]
    bad_sample = engine.submit([1, 2, 3], poison_sample)
    bad_prefill = engine.submit(poison_prompt, SamplingParams(max_tokens=3))
    twin = engine.submit([9] * 5, SamplingParams(max_tokens=3, temperature=0.0))  # same length: same prefill group
    engine.run_until_done()
    assert bad_sample.finish_reason == "error" and "boom in sampling" in bad_sample.error
    assert len(bad_sample.tokens) == 3  # it failed at its fourth token, in the decode batch
    assert bad_prefill.finish_reason == "error" and "boom in prefill" in bad_prefill.error
    assert twin.tokens == _reference(model, [9] * 5, twin.params)
    for req, tokens in zip(healthy, want, strict=True):
        assert req.finish_reason == "length" and req.tokens == tokens
    assert engine.errors == 2 and engine.runner.batch is None and engine.metrics.running == 0


def test_seeds_and_temperatures_are_checked_at_the_boundary():
    engine = Engine(_model("hawk"), step="model")
    for params, message in [
        (SamplingParams(seed=2**63), "seed must lie in"),
        (SamplingParams(seed=-(2**63) - 1), "seed must lie in"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(temperature=float("inf")), "temperature"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.check([1], params)
    for seed in (2**63 - 1, -(2**63)):  # the extremes run
        req = engine.submit([1, 2], SamplingParams(max_tokens=2, seed=seed))
        engine.run_until_done()
        assert req.finish_reason == "length"


def test_limits_name_the_limit_and_the_value():
    from griffon.engine.limits import LimitExceeded, Limits

    limits = Limits(max_prompt_tokens=10, max_tokens=5, max_logprob_entries=30)
    engine = Engine(_model("griffin"), step="model", limits=limits)
    for prompt, params, message in [
        (
            [1] * 11,
            SamplingParams(max_tokens=1),
            "the prompt has 11 tokens; this server's limit is max_prompt_tokens=10",
        ),
        ([1], SamplingParams(max_tokens=6), "max_tokens is 6; this server's limit is max_tokens=5"),
        ([1] * 10, SamplingParams(max_tokens=1, logprobs=2, echo=True), "asks for 33 log-probabilities"),
    ]:
        with pytest.raises(LimitExceeded, match=message):
            engine.check(prompt, params)
    engine.check([1] * 9, SamplingParams(max_tokens=1, logprobs=2, echo=True))  # 30 entries: at the limit


def test_prefix_cache_hash_collisions_miss(monkeypatch):
    """With every key the same, a lookup never returns another prompt's state."""
    from griffon.engine import prefix_cache

    monkeypatch.setattr(prefix_cache, "chain_hash", lambda key, block: b"same")
    model = _model("griffin")
    params = SamplingParams(max_tokens=4, temperature=0.0)
    engine = Engine(model, prefill_chunk=CHUNK, step="model")
    first = list(range(1, 1 + 2 * CHUNK))
    engine.submit(first, params)
    engine.run_until_done()
    assert len(engine.prefix_cache) == 1
    other = list(range(20, 20 + 2 * CHUNK))  # no common prefix
    half = first[:CHUNK] + list(range(40, 40 + CHUNK))  # shares the first chunk only
    assert engine.prefix_cache.lookup(other) is None and engine.prefix_cache.lookup(half) is not None
    reqs = [engine.submit(p, params) for p in (other, half)]
    engine.run_until_done()
    assert [r.cached_tokens for r in reqs] == [0, CHUNK]
    for req, prompt in zip(reqs, (other, half), strict=True):
        assert req.tokens == _reference(model, prompt, params)


def test_plain_and_scored_prompts_of_one_length_prefill_apart():
    """A scored prompt (echo with logprobs) needs every position's logits, a plain one only the last:
    prompts of equal length but different kinds are prefilled in separate forwards, in one step."""
    model = _model("griffin")
    prompt = [3, 1, 4, 1, 5, 9]
    engine = Engine(model, prefill_chunk=CHUNK, step="model")
    plain = engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0.0))
    scored = engine.submit(prompt, SamplingParams(max_tokens=0, echo=True, logprobs=1))
    engine.step()
    assert scored.finished and plain.tokens
    with torch.no_grad():
        logp = model(torch.tensor([prompt]))[0][0].log_softmax(-1)
    entries = scored.logprob_entries(0, len(prompt))
    assert [e.logprob for e in entries[1:]] == pytest.approx([float(logp[t, prompt[t + 1]]) for t in range(5)])
    engine.run_until_done()
    assert plain.tokens == _reference(model, prompt, plain.params)


def test_a_finished_request_is_not_counted_running_when_its_answer_is_released():
    """``running`` and ``queue_length`` are current when a request's answer is released (its
    notify on finishing), not as of the end of the last iteration."""
    engine = Engine(_model("hawk"), max_batch=2, step="model")
    seen = {}

    def notify(req):
        if req.finished:
            seen[req.id] = (engine.metrics.running, engine.metrics.queue_length)

    long = engine.submit([1, 2, 3], SamplingParams(max_tokens=5), notify=notify)
    short = engine.submit([4], SamplingParams(max_tokens=1), notify=notify)
    waiting = engine.submit([5], SamplingParams(max_tokens=1), notify=notify)
    engine.run_until_done()
    # short ends in the first iteration (long still running, waiting queued); waiting is then admitted
    assert seen == {short.id: (1, 1), waiting.id: (1, 0), long.id: (0, 0)}


def test_a_long_prompt_costs_memory_linear_in_its_length():
    """Prefill of a long prompt with the prefix cache on (a snapshot every chunk) and of a scored
    one (echo with 20 logprobs): Python-side memory grows linearly in the prompt's length, with a
    small constant, not with one copy of the prefix per snapshot or one dict per scored token."""
    torch.manual_seed(0)
    model = Griffon(ModelConfig(**{**BASE, "attention_window": 6})).eval()
    chunk = 16

    def run(n: int, params: SamplingParams) -> int:
        engine = Engine(model, prefill_chunk=chunk, step_tokens=4 * chunk, step="model", prefix_cache_bytes=2**30)
        prompt = [i % 64 for i in range(n)]
        return peak_traced_bytes(lambda: (engine.submit(prompt, params), engine.run_until_done()))

    plain = SamplingParams(max_tokens=1)
    scored = SamplingParams(max_tokens=1, echo=True, logprobs=20)
    small, large = run(1024, plain), run(4096, plain)
    # One int64 token per snapshot's prefix node plus the prompt's list: ~16 B/token. A copy of the
    # prefix per snapshot would be 8 * 4096**2 / (2 * 16) = 4 MiB here.
    assert (large - small) / (4096 - 1024) < 200, (small, large)
    small, large = run(1024, scored), run(4096, scored)
    # 21 entries of 16 bytes per scored token, in arrays that grow by doubling: <= 672 B/token
    assert (large - small) / (4096 - 1024) < 1000, (small, large)


def test_the_runner_prefills_a_group_as_each_prompt_alone_and_keeps_the_batch_rows():
    from griffon.engine.runner import ModelRunner

    model = _model("griffin")
    runner = ModelRunner(model, step="model")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5], [3, 3, 3, 3, 3]]
    alone = [runner.prefill([p], [0], [runner.new_cache()], all_logits=True) for p in prompts]
    logits, caches = runner.prefill(prompts, [0, 0, 0], [runner.new_cache() for _ in prompts], all_logits=True)
    for i, (want, _) in enumerate(alone):
        torch.testing.assert_close(logits[i : i + 1], want, rtol=0, atol=1e-12)
    # a second chunk continues from each cache at its positions; only the last logits
    more, caches = runner.prefill([[4, 4], [5, 5], [6, 6]], [5, 5, 5], caches, all_logits=False)
    assert more.shape == (3, 1, 64)
    for cache in caches:
        runner.join(cache)
    next_logits = runner.decode([1, 2, 3])  # (3, V)
    runner.drop_rows([0, 2])
    assert runner.batch.batch_size == 1
    reference = model(torch.tensor([prompts[1] + [5, 5, 2]]), torch.arange(8)[None])[0][0, -1]
    torch.testing.assert_close(next_logits[1], reference, rtol=0, atol=1e-10)
    runner.drop_rows([0])
    assert runner.batch is None


def test_the_output_processor_says_why_a_request_stops():
    from griffon.data.tokenizers import ByteTokenizer
    from griffon.engine.output import OutputProcessor
    from griffon.engine.request import Request

    tok = ByteTokenizer()
    tok.eos_id = 0
    out = OutputProcessor(tok)
    logits = torch.zeros(1, 256)

    def run(params: SamplingParams, tokens: list[int]) -> tuple[Request, list[str | None]]:
        """The reasons after each token, until the first one that stops the request."""
        req, reasons = Request("r", [1], params), []
        out.open(req)
        for t in tokens:
            reasons.append(out.append(req, t, logits))
            if reasons[-1] is not None:
                break
        return req, reasons

    assert run(SamplingParams(max_tokens=3), [97, 98, 99, 100])[1] == [None, None, "length"]
    assert run(SamplingParams(max_tokens=9), [97, 0, 98])[1] == [None, "stop"]  # EOS
    assert run(SamplingParams(max_tokens=9, ignore_eos=True), [97, 0])[1] == [None, None]
    assert run(SamplingParams(max_tokens=9, stop_token_ids=[98]), [97, 98, 99])[1] == [None, "stop"]
    req, reasons = run(SamplingParams(max_tokens=9, stop=["cd"], logprobs=1), [97, 98, 99, 100, 101])
    assert reasons == [None, None, None, "stop"] and req.text.text == "ab"
    assert len(req.logprobs) == 4 and req.logprobs.rows(0, 1)[0].logprob == pytest.approx(-math.log(256))
