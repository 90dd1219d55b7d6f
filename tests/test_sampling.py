"""The batched sampler: each row with its own settings and random stream draws from its own
filtered softmax, whatever shares its batch; greedy rows take the argmax; every temperature is finite."""

import pytest
import torch

from griffon.decode.sampling import GREEDY_BELOW, SamplingParams, adjust_logits, check_prompt, sample


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rows_draw_from_their_own_softmax():
    """Frequencies of 10,000 draws match softmax(logits / T) on the tokens top-k and top-p keep
    (within 0.02: four standard errors at worst)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 10_000
    cases = [
        (SamplingParams(temperature=1.0), torch.softmax(logits[0], -1)),
        (SamplingParams(temperature=0.5), torch.softmax(logits[0] / 0.5, -1)),
        (SamplingParams(temperature=1.0, top_k=2), torch.softmax(torch.tensor([2.0, 1.0]), -1)),
        # top_p=0.6: token 0 holds 0.57 of the mass, so token 1 (before which 0.57 < 0.6) stays, 2 goes
        (SamplingParams(temperature=1.0, top_p=0.6), torch.softmax(torch.tensor([2.0, 1.0]), -1)),
        # min_p=0.3 keeps tokens of at least 0.3 x the likeliest's probability: exp(-1) = 0.37 stays,
        # exp(-1.5) = 0.22 goes
        (SamplingParams(temperature=1.0, min_p=0.3), torch.softmax(torch.tensor([2.0, 1.0]), -1)),
    ]
    for params, want in cases:
        g = _gen(0)
        draws = torch.cat([sample(logits, [params], [g]) for _ in range(n)])
        freq = torch.bincount(draws, minlength=5).float() / n
        full = torch.zeros(5)
        full[: len(want)] = want
        assert torch.allclose(freq, full, atol=0.02), (params, freq, full)


def test_a_row_does_not_depend_on_its_batch_mates():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    params = [SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.3, top_k=5), SamplingParams(temperature=1.0, top_p=0.8)]  # fmt: skip
    together = sample(logits, params, [_gen(10 + i) for i in range(4)])
    for i in range(4):
        alone = sample(logits[i : i + 1], [params[i]], [_gen(10 + i)])
        assert int(alone) == int(together[i])
    assert int(together[1]) == int(logits[1].argmax())  # greedy: exactly the argmax


def test_every_temperature_is_finite_and_tiny_ones_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 30
    for t in (5e-324, 1e-40, 2e-39, 1e-6):
        assert t < GREEDY_BELOW
        params = [SamplingParams(temperature=t)] * 3
        assert torch.equal(sample(logits, params, [_gen(0)] * 3), logits.argmax(-1))
    for t in (GREEDY_BELOW, 1e-4, 0.01, 1.0, 2.0):
        for top_k, top_p in ((None, None), (5, None), (None, 0.5)):
            params = [SamplingParams(temperature=t, top_k=top_k, top_p=top_p)] * 3
            tokens = sample(logits, params, [_gen(i) for i in range(3)])
            assert tokens.shape == (3,) and ((0 <= tokens) & (tokens < 50)).all()
    assert torch.equal(sample(logits, [SamplingParams(temperature=1e-4)] * 3, [_gen(0)] * 3), logits.argmax(-1))


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(seed=2**63), "seed must lie in"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(top_k=0), "top_k"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(max_tokens=0), "only with echo"),
        (SamplingParams(logprobs=21), "logprobs"),
        (SamplingParams(presence_penalty=-2.5), "presence_penalty must lie in"),
        (SamplingParams(frequency_penalty=float("nan")), "frequency_penalty must lie in"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty must lie in"),
        (SamplingParams(logit_bias=((3, 200.0),)), "logit_bias of token 3"),
        (SamplingParams(min_p=-0.1), "min_p"),
        (SamplingParams(max_tokens=2, min_tokens=3), "min_tokens"),
    ],
)
def test_parameters_are_checked_once(params, message):
    with pytest.raises(ValueError, match=message):
        params.validate()


def test_prompts_are_checked_once():
    for prompt, message in (
        ([], "empty"),
        ([5, 70], r"\[0, 64\), got 70"),
        ([1] * 10, "exceeds the model's limit of 12"),
    ):
        with pytest.raises(ValueError, match=message):
            check_prompt(prompt, 64, 12, 3)
    check_prompt([1] * 9, 64, 12, 3)


def test_penalties_biases_and_min_tokens_by_hand():
    """adjust_logits against the formulas: logit_bias added; the repetition penalty divides the
    positive and multiplies the negative logits of the prompt's and output's tokens; frequency
    and presence penalties subtract per occurrence in the output and once; under min_tokens, EOS
    and the stop tokens are barred."""
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.5, -0.5, 2.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                            logit_bias=((5, -3.0), (0, 1.0)), min_tokens=4, stop_token_ids=(3,), max_tokens=9)  # fmt: skip
    prompt, output = [1, 2], [2, 4, 4]
    want = [1.0 + 1.0, -2.0 * 2, 3.0 / 2 - 0.5 - 0.25, float("-inf"), -0.5 * 2 - 1.0 - 0.25, float("-inf")]
    # token 5 is EOS, barred like the stop token 3 until 4 tokens are out
    got = adjust_logits(logits, [params], [prompt], [output], eos_id=5)
    assert got[0].tolist() == pytest.approx(want)
    after = adjust_logits(logits, [params], [prompt], [output + [0]], eos_id=5)[0]
    assert after[3] == 0.5 and after[5] == 2.0 - 3.0  # 4 tokens out: no longer barred
    assert adjust_logits(logits, [SamplingParams()], [prompt], [output]) is logits  # nothing to do: untouched
    ignoring = SamplingParams(min_tokens=4, max_tokens=9, ignore_eos=True)
    assert adjust_logits(logits, [ignoring], [prompt], [output], eos_id=5)[0, 5] == 2.0
