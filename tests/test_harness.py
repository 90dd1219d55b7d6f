"""griffon under lm-evaluation-harness: the offline tasks end to end, and each request type against
griffon's own scoring and generation."""

import pytest
import torch
from torch.nn import functional as F

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from griffon import Griffon, get_preset, save_pretrained  # noqa: E402
from griffon.data.tokenizers import ByteTokenizer  # noqa: E402
from griffon.decode import generate_text  # noqa: E402
from griffon.eval.harness import TASKS_DIR, GriffonLM  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(Griffon(get_preset("griffin-tiny")), path)
    ByteTokenizer().save(path)
    return GriffonLM(pretrained=str(path), batch_size=3, max_length=64)


def test_offline_tasks_run_end_to_end(lm):
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["griffon_next_line", "griffon_last_word"], task_manager=TaskManager(include_path=str(TASKS_DIR)),
        limit=6,
    )["results"]  # fmt: skip
    assert 0.0 <= results["griffon_next_line"]["acc,none"] <= 1.0
    assert results["griffon_last_word"]["perplexity,none"] > 1.0


def _full_logprob(model, ids):
    with torch.no_grad():
        logits, _ = model(torch.tensor(ids)[None])
    return -F.cross_entropy(logits[0, :-1].double(), torch.tensor(ids[1:]), reduction="sum").item()


def test_request_types_match_griffon(lm):
    text = "Now is the winter of our discontent made glorious summer by this sun of York. " * 3
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    (rolling,) = lm.loglikelihood_rolling([request])
    assert rolling == pytest.approx(_full_logprob(lm.model, [lm.eot_token_id, *lm.tok_encode(text)]), abs=1e-3)

    requests = [
        Instance("loglikelihood", {}, ("To be, or not", choice), i) for i, choice in enumerate([" to be", " so"])
    ]
    for (logprob, _), (_, choice) in zip(lm.loglikelihood(requests), (r.args for r in requests), strict=True):
        ids = lm.tok_encode("To be, or not" + choice)
        want = _full_logprob(lm.model, ids) - _full_logprob(lm.model, lm.tok_encode("To be, or not"))
        assert logprob == pytest.approx(want, abs=1e-3)

    free = lm.generate_until([Instance("generate_until", {}, ("KING:", {"until": [], "max_gen_toks": 12}), 0)])[0]
    assert len(lm.tok_encode(free)) == 12  # greedy, byte tokens: 12 of them
    stop = free[4:6]
    cut = lm.generate_until([Instance("generate_until", {}, ("KING:", {"until": [stop], "max_gen_toks": 12}), 0)])[0]
    assert cut == free[: free.find(stop)]


def test_griffon_lm_eval_command(lm, tmp_path, capsys):
    from griffon.cli import main

    ckpt = lm.model_path
    argv = ["lm-eval", "--model", "griffon", "--model_args", f"pretrained={ckpt}", "--tasks", "griffon_next_line",
            "--limit", "3", "--output_path", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    assert "griffon_next_line" in capsys.readouterr().out


def test_model_arguments_override_lm_eval_options_and_unknown_ones_are_refused(lm):
    from griffon.eval.harness import GriffonLM

    ckpt = lm.model_path
    made = GriffonLM.create_from_arg_string(
        f"pretrained={ckpt},batch_size=3", {"batch_size": 1, "max_batch_size": None, "device": "cpu"}
    )
    assert made.batch_size == 3  # the model argument wins over lm-eval's --batch_size
    with pytest.raises(ValueError, match="unknown griffon model argument\\(s\\) bogus; it takes pretrained"):
        GriffonLM.create_from_arg_string(f"pretrained={ckpt},bogus=1")
    with pytest.raises(TypeError):
        GriffonLM(pretrained=str(ckpt), bogus=1)


def test_same_loglikelihoods_as_lm_eval_hf_model_on_the_export(lm, tmp_path):
    """The checkpoint exported with ``griffon export-hf`` and scored by lm-eval's own ``hf`` model
    gives every request the same loglikelihood (fp32, within 1e-4) and greedy flag: griffon's
    prefill-once scoring changes the cost, not the numbers. The tasks' texts are longer than the
    model's attention window."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import lm_eval.models  # noqa: F401 - registers lm-eval's own models, ``hf`` among them

    from griffon.cli import main

    assert main(["export-hf", str(lm.model_path), str(tmp_path / "hf")]) == 0
    tasks = ["griffon_next_line", "griffon_last_word"]
    manager = TaskManager(include_path=str(TASKS_DIR))
    ours = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=8, log_samples=True)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                     device="cpu", batch_size=3, tasks=tasks, task_manager=manager, limit=8,
                                     log_samples=True)  # fmt: skip
    assert torch.is_grad_enabled()
    for task in tasks:
        pairs = [
            (mine, hf)
            for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True)
            for mine, hf in zip(a["resps"], b["resps"], strict=True)
        ]
        assert len(pairs) >= 8
        for (mine,), (hf,) in pairs:
            assert mine[0] == pytest.approx(hf[0], abs=1e-4)
            assert bool(mine[1]) == bool(hf[1])


def test_rolling_windows_score_as_lm_eval_hf_model_and_carry_sees_more(lm, tmp_path):
    """``rolling=windows`` gives lm-eval's HF model's rolling loglikelihood on the exported model
    (disjoint windows of max_length); the default ``carry`` reads the text once with its state, so
    its score differs (more context) and equals the whole text's log-probability."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    from griffon.cli import main

    assert main(["export-hf", str(lm.model_path), str(tmp_path / "hf")]) == 0
    text = "Now is the winter of our discontent made glorious summer by this sun of York. " * 2  # 156 tokens
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    windows = GriffonLM(pretrained=str(lm.model_path), batch_size=2, max_length=20, rolling="windows")
    hf = HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", device="cpu", batch_size=2, max_length=20)
    (mine,) = windows.loglikelihood_rolling([request])
    (theirs,) = hf.loglikelihood_rolling([request])
    assert mine == pytest.approx(theirs, abs=1e-3)
    carry = GriffonLM(pretrained=str(lm.model_path), batch_size=2, max_length=20)
    (whole,) = carry.loglikelihood_rolling([request])
    assert whole == pytest.approx(_full_logprob(lm.model, [lm.eot_token_id, *lm.tok_encode(text)]), abs=1e-3)
    assert abs(whole - mine) > 1.0
    with pytest.raises(ValueError, match="rolling='overlap': it is one of carry, windows"):
        GriffonLM(pretrained=str(lm.model_path), rolling="overlap")


def test_generate_until_keeps_the_contexts_last_tokens_as_lm_eval_hf_model():
    """With max_length 24 and 8 new tokens, a context keeps its last 16 tokens: the output is the
    one generated from those alone."""
    torch.manual_seed(0)
    model = GriffonLM.__new__(GriffonLM)
    model.model, model.griffon_tokenizer = Griffon(get_preset("griffin-tiny")).eval(), ByteTokenizer()
    model.max_length, model.step = 24, "model"
    context = "To be, or not to be, that is the question"
    asked = model.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 8}), 0)])
    last = context.encode()[-16:].decode()
    alone = model.generate_until([Instance("generate_until", {}, (last, {"until": [], "max_gen_toks": 8}), 0)])
    assert asked == alone and len(asked[0].encode()) == 8
    whole = generate_text(model.model, model.griffon_tokenizer, [context], 8, step="model")  # not cut
    assert whole != asked  # the cut changes what this model generates
