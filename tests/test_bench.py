"""The benchmarks run from the command line on tiny shapes and write their JSON (figures not checked:
timings belong in the benchmarks' own printouts, not in tests)."""

import json

import pytest
import torch

from griffon.cli import main


@pytest.mark.parametrize(
    "argv, keys",
    [
        (["scan", "--batch", "2", "--seq", "33", "--dim", "8", "--repeats", "1"], {"cpu_kernel", "cpu_autograd"}),
        (["ffn", "--widths", "32", "--tokens", "16", "--repeats", "1"], {"widths"}),
        (["train", "--preset", "griffin-tiny", "--batch", "1", "--seq", "40", "--repeats", "1"], {"tokens_per_s"}),
        (
            ["moe", "--width", "32", "--tokens", "50", "--repeats", "1"],
            {"forward_vs_reference", "forward_backward_vs_dense"},
        ),
    ],
    ids=["scan", "ffn", "train", "moe"],
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


def test_gpu_bench_refuses_without_a_gpu_and_counts_minimum_traffic():
    from griffon.bench.gpu import min_traffic_bytes

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            main(["bench", "gpu", "--sections", "scan"])
    assert min_traffic_bytes("scan", 10, torch.float32) == 10 * 32  # a, x, h; dh, a, h, da, dx
    assert min_traffic_bytes("rglru", 10, torch.bfloat16) == 10 * (11 * 2 + 8)


def test_gpu_bench_pieces_run(tmp_path):
    """The GPU benchmark's cases, training step and plot, run on the CPU (the kernels interpreted)
    on tiny shapes: what a GPU session runs is exercised here first."""
    from griffon.bench import gpu

    pytest.importorskip("triton")
    for fn, nbytes in gpu.scan_cases(1, 8, 4, torch.float32, None, None, device="cpu").values():
        fn()
        assert nbytes > 0
    model = gpu._model("mqa", "20m", 64, device="cpu")
    model.set_attention_kernel("blocks")  # SDPA's causal kernel is the GPU's; the step is what is tested
    tokens = torch.randint(0, 100, (1, 17))
    before = [p.detach().clone() for p in model.parameters()]
    gpu.train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3), tokens)()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    results = {
        "machine": {"cuda": "test"},
        "scan": [dict(kernel="k", shape=[1, 8, 4], dtype="float32", of_copy_bandwidth=0.5)],
        "train": [dict(model="griffin", seq_len=2048, tokens_per_s=1.0), dict(model="mqa", seq_len=2048, oom=True)],
        "sample": [dict(model="griffin", step="graph", batch=1, tokens_per_s=2.0)],
    }
    rows = gpu.bench_sample("tiny", [1, 3], 4, runs=(("griffin", "model"), ("mqa", "model")), device="cpu")
    assert [(r["model"], r["batch"]) for r in rows] == [("griffin", 1), ("griffin", 3), ("mqa", 1), ("mqa", 3)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    gpu.plot(results, tmp_path / "gpu.png")
    assert (tmp_path / "gpu.png").stat().st_size > 0
