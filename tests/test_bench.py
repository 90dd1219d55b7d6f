"""The benchmarks run from the command line on tiny shapes and write their JSON (figures not checked:
timings belong in the benchmarks' own printouts, not in tests)."""

import json

import pytest

from griffon.cli import main


@pytest.mark.parametrize(
    "argv, keys",
    [
        (["scan", "--batch", "2", "--seq", "33", "--dim", "8", "--repeats", "1"], {"cpu_kernel", "cpu_autograd"}),
        (["ffn", "--widths", "32", "--tokens", "16", "--repeats", "1"], {"widths"}),
        (["train", "--preset", "griffin-tiny", "--batch", "1", "--seq", "40", "--repeats", "1"], {"tokens_per_s"}),
    ],
    ids=["scan", "ffn", "train"],
)
def test_bench_commands_write_results(argv, keys, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["bench", *argv, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert keys <= set(results) and "machine" in results
    if argv[0] == "train":  # griffon and both references (installed with the test extras) were timed
        assert set(results["tokens_per_s"]) == {"griffon", "hf", "deepmind"}


def test_bench_eval_scores_the_same_requests_as_lm_eval_hf(tmp_path):
    """Both models score the same requests with the same answers; the work bound counts tokens."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    out = tmp_path / "out.json"
    argv = ["bench", "eval", "--tasks", "griffon_next_line", "--limit", "3", "--batch-sizes", "2", "--warmup", "2"]
    assert main([*argv, "--json", str(out)]) == 0
    task = json.loads(out.read_text())["tasks"]["griffon_next_line"]
    assert task["requests"] == 12 and task["contexts"] == 3
    assert task["tokens_each_request_whole"] > task["tokens_context_shared"] > 0
    (run,) = task["runs"]
    assert run["max_abs_loglikelihood_diff"] <= 1e-4
