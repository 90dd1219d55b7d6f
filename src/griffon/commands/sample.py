"""``griffon sample``: stream a sample from a run or checkpoint."""

from __future__ import annotations

import argparse
import sys

from griffon.decode.steps import STEPS


def run(args: argparse.Namespace) -> None:
    from griffon.checkpoint import load_for_inference
    from griffon.decode import TextStream, calibrate_merge_thresholds, stream_tokens

    chat = args.chat or args.chat_template or args.system is not None or args.messages is not None
    messages = _conversation(args) if chat else []  # checked before the model is loaded
    model, tokenizer = load_for_inference(args.model, device="cpu")
    calibrate_merge_thresholds(model)  # structured FFNs: pre-merge where this machine makes it faster
    prompt, stops = args.prompt if args.prompt is not None else "\n", list(args.stop)
    if chat:  # the prompt is a user's turn; the reply alone is printed
        from griffon.align.chat import template_for

        template = template_for(tokenizer, args.chat_template)
        prompt = template.render(messages)
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


def _conversation(args: argparse.Namespace) -> list[dict]:
    """The conversation to continue: ``--messages`` (a JSON file of ``{"role", "content"}``), a
    ``--system`` message first, and ``--prompt`` as the last user turn."""
    from griffon.align.chat import check_messages
    from griffon.files import CONFIG_BYTES, read_json

    messages = read_json(args.messages, CONFIG_BYTES, "a messages file") if args.messages is not None else []
    if not isinstance(messages, list):
        raise ValueError(f"{args.messages} must hold a JSON list of messages")
    if args.system is not None:
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            raise ValueError(f"--system given and {args.messages} starts with a system message: give one")
        messages = [{"role": "system", "content": args.system}, *messages]
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
    check_messages(messages)
    if messages[-1]["role"] == "assistant":
        raise ValueError("the conversation ends with an assistant turn: end it with a user message to answer")
    return messages


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon sample`` to the command line."""
    s = sub.add_parser("sample", help="stream a sample from a run or checkpoint")
    s.add_argument("model", help="run directory or checkpoint directory")
    s.add_argument(
        "--prompt", default=None, help="the text to continue (default: a newline); with --chat the user's message"
    )
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
    s.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the conversation")
    s.add_argument("--messages", metavar="FILE",
                   help='with --chat: a JSON file of the conversation so far, [{"role": ..., "content": ...}, ...]; '
                        "--prompt, if given, is added as the last user turn")  # fmt: skip
    s.add_argument("--step", choices=STEPS, default="auto",
                   help="decode step: the model's own, fused CPU kernels, torch.compile'd (a minute or so to "
                        "compile, then faster), or CUDA graphs (GPU); auto: fused where it covers the model")  # fmt: skip
    s.set_defaults(fn=run)
