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


def build_engine(options: dict):
    """The engine ``griffon serve`` serves, built from its options (``vars(args)``'s engine part):
    in the engine's own process (``--engine process``), or in the server's."""
    from griffon.checkpoint import load_for_inference
    from griffon.decode import calibrate_merge_thresholds
    from griffon.machine import free_memory
    from griffon.serve import Engine, limits, server

    log = server.configure_logging()
    model, tokenizer = load_for_inference(options["model"], device=options["device"])
    calibrate_merge_thresholds(model)
    max_prompt = options["max_prompt_tokens"]
    if max_prompt is None:
        memory = int(limits.MEMORY_SHARE * free_memory(model.embed.weight.device))
        max_prompt = limits.default_max_prompt_tokens(
            model, options["max_batch"], options["max_queue"], options["step_tokens"], memory
        )
        log.info("--max-prompt-tokens %d: fits %.1f GB (half the free memory)", max_prompt, memory / 1e9)
        if max_prompt < options["prefill_chunk"]:
            log.warning(
                "%d slots of this model hardly fit %.1f GB: prompts are limited to %d tokens; "
                "lower --max-batch, or set --max-prompt-tokens", options["max_batch"], memory / 1e9, max_prompt
            )  # fmt: skip
    request_limits = limits.Limits(
        max_prompt_tokens=max_prompt, max_tokens=options["max_tokens"],
        max_logprob_entries=options["max_logprob_entries"], request_timeout=options["request_timeout"],
    )  # fmt: skip
    return Engine(
        model, tokenizer, max_batch=options["max_batch"], max_queue=options["max_queue"],
        prefill_chunk=options["prefill_chunk"], step_tokens=options["step_tokens"],
        prefix_cache_bytes=int(options["prefix_cache_mb"] * 2**20), step=options["step"], limits=request_limits,
    )  # fmt: skip


ENGINE_OPTIONS = ("model", "device", "max_prompt_tokens", "max_batch", "max_queue", "step_tokens", "prefill_chunk",
                  "max_tokens", "max_logprob_entries", "request_timeout", "prefix_cache_mb", "step")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    import functools

    from griffon.checkpoint import resolve_with_tokenizer

    try:
        from griffon.serve import server
    except ImportError as e:
        raise SystemExit(f"griffon serve needs the serve extra: pip install 'griffon[serve]' ({e})") from e
    from griffon.serve.engine_process import EngineProcess

    log = server.configure_logging()
    api_key = _api_key(args)
    template = None
    if args.chat_template:  # read and compiled before any model is loaded
        from griffon.align.chat import template_for

        template = template_for(None, args.chat_template)
    options = {k: getattr(args, k) for k in ENGINE_OPTIONS}
    if args.engine == "process":
        tokenizer = resolve_with_tokenizer(args.model)[1]  # a bad checkpoint is told before the process starts
        engine = EngineProcess(functools.partial(build_engine, options), tokenizer)
        engine.start()
    else:
        engine = build_engine(options)
    name = args.name or Path(args.model).resolve().name
    app = server.create_app(
        engine, name, api_key=api_key, max_body_bytes=int(args.max_body_mb * 2**20), chat_template=template,
        stall_timeout=args.stall_timeout, body_timeout=args.body_timeout,
    )  # fmt: skip
    log.info("serving %s at http://%s:%d/v1 (OpenAI completions and chat completions)", name, args.host, args.port)
    server.run(app, args.host, args.port, args.shutdown_timeout, args.max_connections)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``griffon serve`` to the command line."""
    from griffon.serve import limits
    from griffon.serve.engine import DEFAULT_STEP_TOKENS

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
