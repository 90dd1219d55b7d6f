"""The ``griffon`` commands, one module each: ``register(sub)`` adds the command's parser, whose
``fn`` default is the function that runs it. :mod:`griffon.cli` only dispatches."""

from griffon.commands import (
    bench,
    convert,
    data,
    distill,
    evaluation,
    export_hf,
    info,
    lm_eval,
    presets,
    probe,
    rewards,
    sample,
    scaling,
    serve,
    sweep,
    tokenizer,
    train,
)

# In the order ``griffon --help`` lists them.
COMMANDS = (info, presets, convert, train, distill, sample, serve, evaluation, lm_eval, data, tokenizer, bench, sweep,
            scaling, export_hf, rewards, probe)  # fmt: skip
