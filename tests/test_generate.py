"""Batched generation: greedy equals full-forward argmax, mixed lengths equal single rows, stops, errors."""

import json

import pytest
import torch

from griffon import Griffon, get_preset
from griffon.config import ModelConfig
from griffon.decode import generate, generate_stream

from oracles import deepmind, deepmind_pair

PRESETS = ["griffin-tiny", "hawk-tiny", "mqa-tiny"]


def _model(name):
    torch.manual_seed(0)
    return Griffon(get_preset(name)).eval()


def _argmax_continuation(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("name", PRESETS)
def test_greedy_equals_full_forward_argmax(name):
    model = _model(name)
    prompt = torch.randint(0, 256, (21,)).tolist()
    # 40 new tokens: well past griffin-tiny's window of 16
    got = generate(model, [prompt], 40, temperature=0.0, prefill_chunk=8)[0]
    assert got == _argmax_continuation(model, prompt, 40)


@pytest.mark.parametrize("name", PRESETS)
def test_mixed_length_batch_equals_rows_alone(name):
    model = _model(name)
    # equal lengths are prefilled together, out of order: the rows must come back in place
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (18, 1, 37, 5, 18, 5)]
    batch = generate(model, prompts, 25, temperature=0.0, prefill_chunk=16)
    for prompt, row in zip(prompts, batch, strict=True):
        assert row == generate(model, [prompt], 25, temperature=0.0)[0]


@pytest.mark.parametrize("name", PRESETS)
@torch.inference_mode()
def test_padded_prefill_equals_each_prompt_alone(name):
    """Left padding is a document of its own: each prompt's last logits, and the logits of a chunk
    continued from its cache, equal the prompt's own. Prompts longer and shorter than the window,
    prefilled in chunks that split them unevenly."""
    from griffon.decode.generate import prefill

    model = _model(name)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (1, 37, 5, 18)]
    nxt = torch.randint(0, 256, (len(prompts), 23))
    last, cache = prefill(model, prompts, chunk=16, pad=True)
    after, _ = model(nxt, cache=cache)
    for row, prompt in enumerate(prompts):
        want_last, alone = prefill(model, [prompt], chunk=16)
        want_after, _ = model(nxt[row : row + 1], cache=alone)
        torch.testing.assert_close(last[row], want_last[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(after[row], want_after[0], rtol=1e-5, atol=1e-5)


def _cut_after(tokens, stop):
    """tokens up to and including the first occurrence of the sequence ``stop``."""
    for i in range(len(stop), len(tokens) + 1):
        if tokens[i - len(stop) : i] == stop:
            return tokens[:i]
    return tokens


def test_eos_and_stop_sequences_stop_their_rows_only():
    model = _model("griffin-tiny")
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (4, 9)]
    free = generate(model, prompts, 20, temperature=0.0)
    eos = free[0][5]
    stopped = generate(model, prompts, 20, temperature=0.0, eos_id=eos)
    assert stopped == [_cut_after(free[0], [eos]), _cut_after(free[1], [eos])]
    assert len(stopped[0]) <= 6
    stop = free[1][3:5]
    by_seq = generate(model, prompts, 20, temperature=0.0, stop_sequences=[stop])
    assert by_seq == [_cut_after(free[0], stop), _cut_after(free[1], stop)]
    assert len(by_seq[1]) <= 5
    steps = list(generate_stream(model, prompts, 20, temperature=0.0, eos_id=eos))
    assert all(step[0] is None for step in steps[len(stopped[0]) :])


def test_sampling_is_seeded_and_filters():
    model = _model("hawk-tiny")
    prompt = [[1, 2, 3]]
    a = generate(model, prompt, 30, temperature=1.0, top_k=5, seed=7)
    assert a == generate(model, prompt, 30, temperature=1.0, top_k=5, seed=7)
    assert a != generate(model, prompt, 30, temperature=1.0, top_k=5, seed=8)
    # top_k=1 and a tiny top_p are greedy
    greedy = generate(model, prompt, 30, temperature=0.0)
    assert generate(model, prompt, 30, temperature=1.0, top_k=1, seed=1) == greedy
    assert generate(model, prompt, 30, temperature=1.0, top_p=1e-6, seed=1) == greedy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[]]), "prompt 0: the prompt is empty"),
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=[[1, 999]]), r"prompt 0: prompt token ids must lie in \[0, 256\), got 999"),
        (dict(prompts=[[1]], top_p=0.0), "top_p must lie in"),
        (dict(prompts=[[1]], top_p=1.5), "top_p must lie in"),
        (dict(prompts=[[1]], temperature=-1.0), "temperature must be"),
        (dict(prompts=[[1] * 120], max_new_tokens=20), "exceeds the model's limit of 128 tokens"),
    ],
)
def test_bad_input(kwargs, message):
    model = _model("mqa-tiny")
    kwargs = {"max_new_tokens": 5} | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, **kwargs)


class _IdsVocab:
    """Stands in for a sentencepiece vocabulary: prompts are written as space-separated ids."""

    def EncodeAsIds(self, text):  # noqa: N802 - the sentencepiece API
        return [int(t) for t in text.split()]

    def DecodeIds(self, ids):  # noqa: N802
        return " ".join(map(str, ids))

    def bos_id(self):
        return 2

    def eos_id(self):
        return 1

    def pad_id(self):
        return 0


def test_greedy_matches_the_deepmind_sampler():
    deepmind()
    from recurrentgemma.torch import sampler as dm_sampler

    cfg = ModelConfig(
        vocab_size=97, width=64, num_layers=3, num_heads=4, lru_width=96, mlp_width=160, attention_window=8
    )
    ref, ours = deepmind_pair(cfg)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]
    out = dm_sampler.Sampler(ref, _IdsVocab(), greedy_sampling=True)(
        [" ".join(map(str, prompt))], total_generation_steps=30, end_sampling_at_eos_token=False
    )
    want = out.tokens[0].tolist()
    got = generate(ours, [[2, *prompt]], 30, temperature=0.0)[0]
    assert got[: len(want)] == want and len(want) >= 20


def test_stop_strings_cut_the_text_and_stop_only_their_row():
    from griffon.data.tokenizers import ByteTokenizer
    from griffon.decode import generate_text

    model, tok = _model("hawk-tiny"), ByteTokenizer()
    prompts = ["To be, or", "Wherefore art thou"]
    free = generate_text(model, tok, prompts, 30, temperature=0.0)
    stop = free[0][6:9]  # a string the first row's greedy text contains
    cut = generate_text(model, tok, prompts, 30, temperature=0.0, stop_strings=[stop, "never-seen"])
    assert cut[0] == free[0][: free[0].find(stop)]
    assert cut[1] == (free[1] if stop not in free[1] else free[1][: free[1].find(stop)])
    steps = []
    checked = generate(model, [tok.encode(prompts[0])], 30, temperature=0.0,
                       stop_check=lambda row, ids: steps.append(len(ids)) or stop in tok.decode(ids))  # fmt: skip
    assert len(checked[0]) == steps[-1] < 30  # the row stopped as soon as the stop string appeared


def test_bench_sample_command_writes_results(tmp_path, capsys):
    from griffon.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "sample", "--width", "32", "--layers", "3", "--window", "8", "--batches", "1,16",
            "--lengths", "12", "--hf-batches", "2", "--json", str(out), "--png", str(tmp_path / "bench.png")]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())
    runs = results["runs"]
    assert set(results["goals"]) == {"griffin_step_vs_roofline_batch_ge_16", "griffon_vs_hf_generate"}
    assert all(r["matmuls_ms"] > 0 for r in runs if "params" in r)
    assert {(r["model"], r["batch"]) for r in runs if "params" in r} == {
        (m, b) for m in ("griffin", "hawk", "mqa") for b in (1, 16)
    }
    assert all(r["tokens_per_s"] > 0 and r["step_vs_roofline"] > 0 for r in runs if "params" in r)
    hf = [r for r in runs if r["model"] == "hf-griffin"]
    assert len(hf) == 1 and hf[0]["batch"] == 2 and hf[0]["griffon_tokens_per_s"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_package_level_generate():
    import griffon
    import griffon.decode

    assert griffon.generate is griffon.decode.generate
    assert len(griffon.generate(_model("hawk-tiny"), [[1, 2, 3]], 4, temperature=0.0)[0]) == 4


def test_bench_goals_take_the_faster_of_the_default_and_compiled_steps(tmp_path):
    from griffon.bench.sampling import goals, plot

    def run(model, batch, ms, compiled_ms, roofline_ms=1.0, length=512):
        return {"model": model, "params": 1, "batch": batch, "length": length, "ms_per_step": ms,
                "compiled_ms_per_step": compiled_ms, "roofline_ms": roofline_ms, "tokens_per_s": 1e3 * batch / ms}  # fmt: skip

    runs = [run("griffin", 16, 5.0, 1.5), run("griffin", 64, 4.0, 9.0), run("mqa", 64, 10.0, 3.0)]
    hf = {"model": "hf-griffin", "batch": 16, "length": 128, "tokens_per_s": 100.0, "griffon_tokens_per_s": 200.0,
          "griffon_compiled_tokens_per_s": 350.0}  # fmt: skip
    results = {"runs": [*runs, hf], "window": 128}
    out = goals(results, window=128)
    roofline = out["griffin_step_vs_roofline_batch_ge_16"]
    assert (roofline["worst"], roofline["batch"], roofline["met"]) == (4.0, 64, False)  # compiled 1.5 at 16
    assert out["griffon_vs_hf_generate"]["ratios"] == {16: 3.5} and out["griffon_vs_hf_generate"]["met"]
    assert out["griffin_vs_mqa_batch_ge_64_len_ge_4x_window"]["ratios"] == [(64, 512, 0.75)]  # 3.0 / 4.0
    plot(results, tmp_path / "goals.png")
    assert (tmp_path / "goals.png").stat().st_size > 0


def test_generate_and_the_engine_stop_by_one_rule():
    """append_token is both paths' rule: EOS (unless ignored), stop tokens and max_tokens, and
    nothing but max_tokens before min_tokens."""
    from griffon.decode.output import append_token
    from griffon.decode.sampling import SamplingParams

    def run(params, tokens, eos=0):
        out, reasons = [], []
        for t in tokens:
            reasons.append(append_token(params, out, None, t, eos))
            if reasons[-1]:
                break
        return reasons

    assert run(SamplingParams(max_tokens=5), [3, 0, 4]) == [None, "stop"]
    assert run(SamplingParams(max_tokens=3, ignore_eos=True), [3, 0, 4]) == [None, None, "length"]
    assert run(SamplingParams(max_tokens=5, stop_token_ids=(4,)), [3, 4]) == [None, "stop"]
    assert run(SamplingParams(max_tokens=5, min_tokens=2), [0, 0]) == [None, "stop"]
    assert run(SamplingParams(max_tokens=1, min_tokens=1), [3]) == ["length"]
