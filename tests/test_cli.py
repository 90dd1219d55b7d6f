"""The command line: every command is one module of griffon.commands, registered in the order
``griffon --help`` lists, and every command and subcommand answers ``--help``."""

import pytest

from griffon.cli import build_parser, main
from griffon.commands import COMMANDS

NAMES = ["info", "presets", "convert", "train", "distill", "sample", "serve", "eval", "lm-eval", "data", "tokenizer", "bench",
         "sweep", "scaling", "export-hf", "rewards", "probe"]  # fmt: skip
SUBCOMMANDS = {"probe": ["train", "eval"], "data": ["prepare", "verify"], "tokenizer": ["train"], "scaling": ["fit", "calibrate"],
               "bench": ["sample", "train", "default-run", "ffn", "moe", "scan", "eval", "serve", "gpu", "finetune"]}  # fmt: skip


def test_one_module_per_command_in_order():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == NAMES and len(COMMANDS) == len(NAMES)
    assert all(callable(getattr(m, "register", None)) for m in COMMANDS)


@pytest.mark.parametrize(
    "argv", [[n] for n in NAMES if n != "lm-eval"] + [[n, s] for n, subs in SUBCOMMANDS.items() for s in subs]
)
def test_every_command_answers_help(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0 and "usage: griffon" in capsys.readouterr().out


def test_presets_and_info_run(capsys):
    assert main(["presets"]) == 0 and "griffin-tiny" in capsys.readouterr().out
    assert main(["info", "griffin-tiny"]) == 0 and "params" in capsys.readouterr().out
