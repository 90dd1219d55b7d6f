"""The serving engine against griffon.generate: same tokens whatever the arrival order and batch
composition; cancellation, timeouts, the prefix-state cache, stops, logprobs, bounds."""

import random

import pytest
import torch

from griffon import Griffon
from griffon.config import ModelConfig
from griffon.decode.generate import generate
from griffon.serve import Engine, QueueFull, SamplingParams

CHUNK = 8
BASE = dict(vocab_size=64, width=32, num_layers=3, num_heads=2, num_kv_heads=1, mlp_width=48)
CONFIGS = {
    "griffin": dict(attention_window=6),
    "hawk": dict(block_pattern=("recurrent",)),
    "mqa": dict(block_pattern=("attention",), attention_window=None, max_seq_len=96),
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
        assert engine._batch is None and not engine._running


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
    engine.prefix_cache.max_bytes = 2 * engine.prefix_cache.nbytes  # room for two snapshots
    for start in range(1, 4):
        engine.submit(list(range(start, start + CHUNK)), SamplingParams(max_tokens=1))
        engine.run_until_done()
    assert len(engine.prefix_cache) == 2 and engine.prefix_cache.nbytes <= engine.prefix_cache.max_bytes
    assert engine.prefix_cache.lookup(list(range(1, 1 + CHUNK))) is None  # the oldest went first
    assert engine.prefix_cache.lookup(list(range(3, 3 + CHUNK))) is not None


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
    assert scored.tokens == [] and scored.prompt_logprobs[0] is None
    for t in range(3):
        entry = scored.prompt_logprobs[t + 1]
        assert entry.logprob == pytest.approx(float(logp[t, [2, 3, 4][t]]), abs=1e-9)
        assert max(entry.top.values()) == pytest.approx(float(logp[t].max()), abs=1e-9)
    assert all(len(lp.top) == 2 for lp in req.logprobs)


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
