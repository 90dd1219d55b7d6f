"""``griffon serve``: an OpenAI-compatible completions server (needs griffon[serve])."""

from __future__ import annotations

import argparse
from pathlib import Path

from griffon.decode.steps import STEPS


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, $GRIFFON_API_KEY or --api-key (which every local user can read
    in the process list, so it is warned about), in that order of preference."""
    import logging
    import os

    if args.api_key_file:
        from griffon.files import KEY_BYTES, FileError, read_text

        try:
            key = read_text(args.api_key_file, KEY_BYTES, "an API key file").strip()
        except FileError as e:
            raise SystemExit(f"griffon serve: {e}") from None
        if not key:
            raise SystemExit(f"griffon serve: --api-key-file {args.api_key_file} is empty")
        return key
    if os.environ.get("GRIFFON_API_KEY"):
        return os.environ["GRIFFON_API_KEY"]
    if args.api_key:
        logging.getLogger("griffon.serve").warning(
            "--api-key puts the key in the process list, where every local user can read it; "
            "use --api-key-file FILE or the GRIFFON_API_KEY environment variable"
        )
    return args.api_key


def run(args: argparse.Namespace) -> None:
    try:
        from griffon.serve import server
    except ImportError as e:
        raise SystemExit(f"griffon serve needs the serve extra: pip install 'griffon[serve]' ({e})") from e
    from griffon.engine.factory import EngineOptions, engine_client
    from griffon.engine.logs import configure_logging

    log = configure_logging()
    api_key = _api_key(args)
    template = None
    if args.chat_template:  # read and compiled before any model is loaded
        from griffon.align.chat import template_for

        template = template_for(None, args.chat_template)
    client = engine_client(EngineOptions.of(vars(args)), in_process=args.engine == "thread")
    name = args.name or Path(args.model).resolve().name
    app = server.create_app(
        client, name, api_key=api_key, max_body_bytes=int(args.max_body_mb * 2**20), chat_template=template,
        stall_timeout=args.stall_timeout, body_timeout=args.body_timeout,
    )  # fmt: skip
    log.info("serving %s at http://%s:%d/v1 (OpenAI completions and chat completions)", name, args.host, args.port)
    server.run(app, args.host, args.port, args.shutdown_timeout, args.max_connections)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon serve`` to the command line."""
    from griffon.engine import limits
    from griffon.engine.core import DEFAULT_STEP_TOKENS

    s = sub.add_parser("serve", help="an OpenAI-compatible completions and chat server (needs griffon[serve])")
    s.add_argument("model", help="run directory or checkpoint directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", help="the model's name in the API (default: the directory's name)")
    s.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template for /v1/chat/completions (default: the tokenizer's, docs/serving.md)")  # fmt: skip
    s.add_argument("--api-key-file", metavar="FILE",
                   help="require 'Authorization: Bearer KEY' on /v1/ endpoints, KEY read from FILE "
                        "(or set $GRIFFON_API_KEY)")  # fmt: skip
    s.add_argument("--api-key", help="the key itself (visible in the process list: prefer --api-key-file)")
    s.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    s.add_argument("--max-batch", type=int, default=64, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond those; then 429")
    s.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill call")
    s.add_argument(
        "--step-tokens", type=int, default=DEFAULT_STEP_TOKENS, help="prompt tokens prefilled per engine iteration"
    )
    s.add_argument("--prefix-cache-mb", type=float, default=256.0, help="prefix-state cache size (0: off)")
    s.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: what fits half the free memory with every slot "
                        f"at the limit, at most {limits.PROMPT_CAP}; docs/serving.md)")  # fmt: skip
    s.add_argument("--max-tokens", type=int, default=limits.DEFAULT_MAX_TOKENS, help="largest max_tokens accepted")
    s.add_argument("--max-logprob-entries", type=int, default=limits.DEFAULT_MAX_LOGPROB_ENTRIES,
                   help="largest (prompt tokens with echo + max_tokens) x (logprobs + 1) accepted")  # fmt: skip
    s.add_argument("--max-body-mb", type=float, default=limits.DEFAULT_MAX_BODY_BYTES / 2**20,
                   help="largest request body (MiB); larger ones get 413")  # fmt: skip
    s.add_argument("--request-timeout", type=float, default=limits.DEFAULT_REQUEST_TIMEOUT,
                   help="seconds from a request's arrival to its abort")  # fmt: skip
    s.add_argument("--stall-timeout", type=float, default=limits.DEFAULT_STALL_TIMEOUT,
                   help="seconds the engine may be silent with requests pending before /health and new "
                        "requests answer 503")  # fmt: skip
    s.add_argument("--body-timeout", type=float, default=limits.DEFAULT_BODY_TIMEOUT,
                   help="seconds from a request's start until its body must have arrived whole; then 408")  # fmt: skip
    s.add_argument("--max-connections", type=int, default=limits.DEFAULT_MAX_CONNECTIONS,
                   help="open connections and running requests held at once; beyond, 503")  # fmt: skip
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests may go on after SIGTERM/SIGINT before they are aborted")  # fmt: skip
    s.add_argument("--step", choices=STEPS, default="auto", help="decode step (see griffon sample --step)")
    s.add_argument("--engine", choices=("process", "thread"), default="process",
                   help="run the engine in its own process (default; docs/serving.md) or on a thread of the server's")  # fmt: skip
    s.set_defaults(fn=run)
