"""``griffon sample``: stream a sample from a run or checkpoint."""

from __future__ import annotations

import argparse
import sys

from griffon.decode.steps import STEPS


def run(args: argparse.Namespace) -> None:
    from griffon.checkpoint import load_for_inference
    from griffon.decode import TextStream, calibrate_merge_thresholds, stream_tokens

    model, tokenizer = load_for_inference(args.model, device="cpu")
    calibrate_merge_thresholds(model)  # structured FFNs: pre-merge where this machine makes it faster
    prompt, stops = args.prompt, list(args.stop)
    if args.chat or args.chat_template:  # the prompt is a user's turn; the reply alone is printed
        from griffon.align.chat import template_for

        template = template_for(tokenizer, args.chat_template)
        prompt = template.render([{"role": "user", "content": args.prompt}])
        stops.append(template.end_of_turn)
    else:
        sys.stdout.write(prompt)
    text = TextStream(tokenizer, stops)
    stream = stream_tokens(
        model, tokenizer.encode(prompt), args.max_new_tokens, args.temperature, args.top_k, args.top_p,
        args.seed, eos_id=tokenizer.eos_id, step=args.step,
    )  # fmt: skip
    for token in stream:
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
        if text.done:
            break
    sys.stdout.write(text.flush() + "\n")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon sample`` to the command line."""
    s = sub.add_parser("sample", help="stream a sample from a run or checkpoint")
    s.add_argument("model", help="run directory or checkpoint directory")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable); the tokenizer's EOS also stops")  # fmt: skip
    s.add_argument("--chat", action="store_true",
                   help="the prompt is a user's message: rendered with the model's chat template "
                        "(docs/finetuning.md), the reply printed alone, stopping at the end of its turn")  # fmt: skip
    s.add_argument("--chat-template", metavar="FILE", help="with --chat: this Jinja chat template instead")
    s.add_argument("--step", choices=STEPS, default="auto",
                   help="decode step: the model's own, fused CPU kernels, torch.compile'd (a minute or so to "
                        "compile, then faster), or CUDA graphs (GPU); auto: fused where it covers the model")  # fmt: skip
    s.set_defaults(fn=run)
