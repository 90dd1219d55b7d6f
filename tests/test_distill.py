"""`griffon distill` on a tiny random teacher (an HF Llama directory built offline): stage 1 lowers
every replaced layer's alignment error, stage 2 lowers the KL to the teacher on held-out text, the
copied tensors stay bitwise the teacher's, a cut run resumes to the same losses, and bad input is
one line before anything is written."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from griffon.checkpoint import open_source  # noqa: E402
from griffon.cli import main  # noqa: E402
from griffon.config import ModelConfig  # noqa: E402
from griffon.data.tokenizers import ByteTokenizer  # noqa: E402
from griffon.distill.student import GELU_ONE, copied_names, init_student, student_config  # noqa: E402
from griffon.model import Griffon  # noqa: E402

TINY = ["data.seq_len=32", "data.batch_size=4", "dtype=fp32", "max_minutes=null", "eval_batches=2",
        "final_eval_batches=2", "log_every=1", "optim.lr=3e-3", "optim.warmup_steps=1", "save_every=3"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / "teacher")
    ByteTokenizer().save_hf(tmp / "teacher")
    words = "the a king queen speaks listens to of and in castle night day sword crown".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (40,), generator=g).tolist()) for _ in range(200)]
    (tmp / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return tmp


def _distill(setup, out, *extra, steps=8):
    argv = ["distill", "--teacher", str(setup / "teacher"), "--window", "8", "--out", str(out),
            *[f"--set={s}" for s in [*TINY, f"max_steps={steps}", f"data.path={setup / 'corpus.jsonl'}"]], *extra]  # fmt: skip
    assert main(argv) == 0


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _copied_are_the_teachers(run, teacher):
    ours, theirs = open_source(run).state_dict(), open_source(teacher).state_dict()
    names = copied_names(open_source(run).config)
    assert names and all(torch.equal(ours[n], theirs[n]) for n in names)


def test_the_student_takes_the_teachers_weights_and_starts_from_its_attention(setup):
    teacher = open_source(setup / "teacher").model().eval()
    cfg = student_config(teacher.config, ("recurrent", "recurrent", "attention"), 8)
    student = Griffon(cfg)
    init_student(student, teacher, "attention")
    for name in copied_names(cfg):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name]), name
    block, attn = student.blocks[0].temporal, teacher.blocks[0].temporal
    v = attn.v.weight.unflatten(0, (2, 8))  # (kv heads, head_dim, width)
    assert torch.equal(block.linear_x.weight[:8], v[0]) and torch.equal(block.linear_x.weight[8:16], v[0])
    assert torch.equal(block.linear_out.weight, attn.o.weight) and not block.linear_y.weight.any()
    assert torch.nn.functional.gelu(torch.tensor(GELU_ONE), approximate="tanh").item() == pytest.approx(1, abs=1e-6)
    assert student.config.block_types == ["recurrent", "recurrent", "attention"]


def test_stage_one_lowers_every_layers_alignment_error(setup, tmp_path):
    _distill(setup, tmp_path / "align", "--stage", "align", steps=30)
    records = _records(tmp_path / "align")
    first = next(r for r in records if r["kind"] == "train")
    last = [r for r in records if r["kind"] == "train"][-1]
    for layer in (0, 1):  # the replaced layers of a (recurrent, recurrent, attention) student
        assert last[f"align_{layer}"] < 0.7 * first[f"align_{layer}"], (layer, first, last)
    _copied_are_the_teachers(tmp_path / "align", setup / "teacher")  # only the new blocks trained


def test_stage_two_lowers_the_kl_to_the_teacher_and_keeps_the_copied_tensors(setup, tmp_path):
    _distill(setup, tmp_path / "kd", "--set=eval_every=1", steps=20)
    evals = [r for r in _records(tmp_path / "kd") if r["kind"] in ("eval", "final_eval")]
    assert evals[-1]["val_kl"] < 0.8 * evals[0]["val_kl"]
    assert evals[-1]["val_teacher_loss"] == evals[0]["val_teacher_loss"]  # the teacher does not move
    _copied_are_the_teachers(tmp_path / "kd", setup / "teacher")
    # the result is a run every reader takes
    assert main(["sample", str(tmp_path / "kd"), "--prompt", "the king", "--max-new-tokens", "4"]) == 0


def test_a_cut_run_resumes_to_the_same_losses(setup, tmp_path):
    _distill(setup, tmp_path / "whole", steps=6)
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_000006")  # as if killed after step 3's checkpoint
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0

    def losses(run):
        return {r["step"]: r["loss"] for r in _records(run) if r["kind"] == "train"}

    assert sorted(losses(tmp_path / "cut")) == list(range(1, 7))
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # bitwise


def test_bad_input_is_one_line_before_anything_is_written(setup, tmp_path, capsys):
    def fails(argv, message):
        assert main(["distill", *argv, "--out", str(tmp_path / "out"), f"--set=data.path={setup / 'corpus.jsonl'}",
                     "--set=max_steps=1"]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()

    fails(["--teacher", str(tmp_path / "nowhere")], "nothing is there")
    wide = ModelConfig.from_dict(open_source(setup / "teacher").config.to_dict()).replace(
        block_pattern=("recurrent", "attention"), mlp_width=50, lru_width=32
    )
    (tmp_path / "wide.json").write_text(wide.to_json())
    fails(["--teacher", str(setup / "teacher"), "--student", str(tmp_path / "wide.json")],
          "tensor 'blocks.0.mlp.gate.weight' is (48, 32) in the teacher, (50, 32) in the student")  # fmt: skip
    fails(["--teacher", str(setup / "teacher"), "--set=data.tokenizer=bytes"], "is not the teacher's")
    narrow = wide.replace(mlp_width=48, lru_width=40, lru_num_blocks=4)
    (tmp_path / "narrow.json").write_text(narrow.to_json())
    fails(["--teacher", str(setup / "teacher"), "--student", str(tmp_path / "narrow.json")],
          "distill.init=attention needs lru_width == num_heads * head_dim = 32")  # fmt: skip


def test_the_data_can_be_sampled_from_the_teacher(setup, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me of the {w}."}) + "\n" for w in "king queen sword crown night day".split()))  # fmt: skip
    argv = ["distill", "--teacher", str(setup / "teacher"), "--window", "8", "--out", str(tmp_path / "run"),
            "--prompts", str(prompts), "--samples", "3", "--max-new-tokens", "24",
            *[f"--set={s}" for s in [*TINY, "max_steps=2", "data.batch_size=2"]]]  # fmt: skip
    assert main(argv) == 0
    corpus = [json.loads(line)["text"] for line in (tmp_path / "run.corpus.jsonl").read_text().splitlines()]
    assert len(corpus) == 18 and all(t.startswith("<|user|>\nTell me of the ") for t in corpus)
    assert "<|assistant|>\n" in corpus[0] and len(set(corpus)) > 6  # each completion seeded on its own
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"]["path"] == str(tmp_path / "run.corpus.jsonl")
