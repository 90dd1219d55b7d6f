"""The ``griffon`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from griffon.atomic import atomic_write
from griffon.config import ModelConfig, apply_overrides
from griffon.decode.steps import STEPS
from griffon.presets import get_preset, preset_names


def resolve_config(name_or_path: str) -> ModelConfig:
    """A preset name, a JSON config file, a checkpoint directory or a run (its newest checkpoint's config)."""
    path = Path(name_or_path)
    if path.is_dir():
        from griffon.checkpoint import load_config, resolve

        return load_config(resolve(path)[0])
    if path.suffix == ".json" or path.is_file():
        return ModelConfig.from_json(path)
    return get_preset(name_or_path)


def cmd_info(args: argparse.Namespace) -> None:
    from griffon.accounting import (
        decode_state_bytes,
        ffn_params,
        forward_flops_per_token,
        param_counts,
        structuredffn_counts,
        train_flops_per_token,
    )

    cfg = resolve_config(args.model)
    if args.seq_len is None:
        args.seq_len = cfg.max_seq_len or 8192
    if args.set:
        cfg = ModelConfig.from_dict(apply_overrides(cfg.to_dict(), args.set))
    params, non_embedding = param_counts(cfg)
    # bf16 weights and caches, as served; the RG-LRU state is float32 regardless.
    state_bytes = decode_state_bytes(cfg, args.seq_len)
    info = {
        "params": params,
        "params_non_embedding": non_embedding,
        "ffn_params": ffn_params(cfg),
        "train_flops_per_token": train_flops_per_token(cfg, args.seq_len),
        "forward_flops_per_token": forward_flops_per_token(cfg, args.seq_len),
        "flops_seq_len": args.seq_len,
        "layers": cfg.block_types,
        "decode_state_bytes_per_sequence": state_bytes,
        "config": cfg.to_dict(),
    }
    if args.tokens is not None:
        info["train_flops"] = info["train_flops_per_token"] * args.tokens
    if args.convention == "structuredffn":
        info["structuredffn"] = structuredffn_counts(cfg, args.seq_len, args.tokens)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"params                  {info['params']:,}")
    print(f"params (non-embedding)  {info['params_non_embedding']:,}")
    print(f"FFN params              {info['ffn_params']:,}")
    print(f"train FLOPs / token     {info['train_flops_per_token']:.4g} at {args.seq_len} tokens per sequence")
    if args.tokens is not None:
        print(f"train FLOPs             {info['train_flops']:.4g} for {args.tokens:.4g} tokens")
    print(f"layers                  {' '.join(t[0].upper() for t in cfg.block_types)}")
    note = f"at {args.seq_len} tokens (grows with length)" if cfg.has_global_attention else "(fixed, any length)"
    print(f"decode state / sequence {state_bytes / 2**20:.2f} MiB bf16 {note}")
    if "structuredffn" in info:
        c = info["structuredffn"]
        line = f"StructuredFFN convention: params {c['params'] / 1e6:.1f}M, FFN {c['ffn_params'] / 1e6:.1f}M"
        if "train_flops" in c:
            line += f", train FLOPs {c['train_flops']:.4g} ({c['steps']} steps of 524288 tokens)"
        print(line)


def cmd_presets(args: argparse.Namespace) -> None:
    for name in preset_names():
        print(name)


def cmd_convert(args: argparse.Namespace) -> None:
    from griffon.convert import convert

    cfg = convert(args.src, args.dst, config_file=args.config, preset=args.preset)
    print(f"wrote {args.dst} ({cfg.num_layers} layers, width {cfg.width}, vocab {cfg.vocab_size})")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from griffon.checkpoint import resolve
    from griffon.convert import export_hf

    ckpt, tokenizer = resolve(args.src)
    export_hf(ckpt, args.dst, tokenizer)
    print(f"wrote HF RecurrentGemma checkpoint to {args.dst}")
    if tokenizer is None:
        print(f"no tokenizer found for {args.src}: {args.dst} holds the model only")


def _train_base(config: str | None, overrides: list[str]) -> dict:
    """The config dict ``griffon train`` starts from: a JSON file, a recipe's name, or the defaults
    with ``model=auto`` when no override names a model."""
    from griffon.train.config import TrainConfig
    from griffon.train.recipes import get_recipe, recipe_names

    if config is None:
        d = TrainConfig().to_dict()
        if not any(o.split("=", 1)[0].split(".")[0] == "model" for o in overrides):
            d["model"] = "auto"
        return d
    if not Path(config).exists() and config in recipe_names():
        return get_recipe(config).to_dict()
    path = Path(config)
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return TrainConfig.load(path).to_dict()  # raises the config loader's clear error
    return d if isinstance(d, dict) and d.get("model") == "auto" else TrainConfig.load(path).to_dict()


def cmd_train(args: argparse.Namespace) -> None:
    from griffon.train.config import TrainConfig, apply_overrides, apply_resume_overrides
    from griffon.train.trainer import train

    plan = None
    if args.resume:
        run_dir = Path(args.resume)
        if args.config or args.out:
            raise ValueError("--resume continues a run with its saved config.json; drop CONFIG and --out")
        cfg = apply_resume_overrides(TrainConfig.load(run_dir / "config.json"), args.set)
    else:
        if args.checkpoint:
            raise ValueError("--checkpoint chooses where --resume continues from; it needs --resume")
        d = apply_overrides(_train_base(args.config, args.set), args.set)
        run_dir = Path(args.out or time.strftime("runs/%Y%m%d-%H%M%S"))
        if d.get("model") == "auto":
            plan = _plan_auto(d, run_dir, _user_lr(args.config, args.set, d))
            d = plan.config
        cfg = TrainConfig.from_dict(d)
    result = train(cfg, run_dir, resume=bool(args.resume), checkpoint=args.checkpoint)
    if plan is not None:
        text = json.dumps(plan.to_dict(), indent=2) + "\n"
        atomic_write(run_dir / "auto.json", lambda tmp: tmp.write_text(text))
    bpb = f", validation {result.val_bpb:.3f} bits/byte (loss {result.val_loss:.3f})" if result.val_bpb else ""
    print(f"trained {result.steps} steps, {result.tokens:,} tokens at {result.tokens_per_s:,.0f} tokens/s{bpb}")
    print(f"run directory: {run_dir}")


def _user_lr(config: str | None, overrides: list[str], d: dict) -> float | None:
    """The learning rate the user set (``--set optim.lr=...`` or in the config file), which
    ``model=auto`` keeps; None when it is the default's, for the plan to choose."""
    if any(o.split("=", 1)[0].strip() == "optim.lr" for o in overrides):
        return d["optim"]["lr"]
    if config is not None and Path(config).is_file():
        try:
            given = json.loads(Path(config).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if isinstance(given, dict) and isinstance(given.get("optim"), dict) and "lr" in given["optim"]:
            return d["optim"]["lr"]
    return None


def _plan_auto(d: dict, run_dir: Path, lr: float | None = None):
    """Resolve ``model=auto`` (:mod:`griffon.train.auto`), after the checks that need no model."""
    from griffon.config import ConfigError
    from griffon.train import auto
    from griffon.train.config import TrainConfig
    from griffon.train.run_dir import holds_run
    from griffon.train.trainer import data_sources

    if holds_run(run_dir):
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
    checked = TrainConfig.from_dict({**d, "model": "griffin-demo"})  # everything but the model, before planning
    if checked.data.path is not None and not Path(checked.data.path).exists():
        raise ConfigError(f"data.path {checked.data.path} not found")
    plan = auto.plan(d, data_sources(checked), lr=lr)
    print(plan.explain(), flush=True)
    return plan


def cmd_sample(args: argparse.Namespace) -> None:
    from griffon.checkpoint import load_for_inference
    from griffon.decode import TextStream, calibrate_merge_thresholds, stream_tokens

    model, tokenizer = load_for_inference(args.model, device="cpu")
    calibrate_merge_thresholds(model)  # structured FFNs: pre-merge where this machine makes it faster
    text = TextStream(tokenizer, args.stop)
    sys.stdout.write(args.prompt)
    stream = stream_tokens(
        model, tokenizer.encode(args.prompt), args.max_new_tokens, args.temperature, args.top_k, args.top_p,
        args.seed, eos_id=tokenizer.eos_id, step=args.step,
    )  # fmt: skip
    for token in stream:
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
        if text.done:
            break
    sys.stdout.write(text.flush() + "\n")


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, $GRIFFON_API_KEY or --api-key (which every local user can read
    in the process list, so it is warned about), in that order of preference."""
    import logging
    import os

    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise SystemExit(f"griffon serve: cannot read --api-key-file {args.api_key_file}: {e.strerror}") from e
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


def cmd_serve(args: argparse.Namespace) -> None:
    from griffon.checkpoint import load_for_inference
    from griffon.decode import calibrate_merge_thresholds

    try:
        from griffon.serve import server
    except ImportError as e:
        raise SystemExit(f"griffon serve needs the serve extra: pip install 'griffon[serve]' ({e})") from e
    from griffon.serve import Engine, limits

    log = server.configure_logging()
    api_key = _api_key(args)
    model, tokenizer = load_for_inference(args.model, device=args.device)
    calibrate_merge_thresholds(model)
    max_prompt = args.max_prompt_tokens
    if max_prompt is None:
        memory = int(limits.MEMORY_SHARE * limits.free_memory(model.embed.weight.device))
        max_prompt = limits.default_max_prompt_tokens(model, args.max_batch, args.max_queue, args.step_tokens, memory)
        log.info("--max-prompt-tokens %d: fits %.1f GB (half the free memory)", max_prompt, memory / 1e9)
        if max_prompt < args.prefill_chunk:
            log.warning(
                "%d slots of this model hardly fit %.1f GB: prompts are limited to %d tokens; "
                "lower --max-batch, or set --max-prompt-tokens", args.max_batch, memory / 1e9, max_prompt
            )  # fmt: skip
    request_limits = limits.Limits(
        max_prompt_tokens=max_prompt, max_tokens=args.max_tokens, max_logprob_entries=args.max_logprob_entries,
        request_timeout=args.request_timeout,
    )  # fmt: skip
    engine = Engine(
        model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
        step_tokens=args.step_tokens, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20), step=args.step,
        limits=request_limits,
    )  # fmt: skip
    name = args.name or Path(args.model).resolve().name
    app = server.create_app(engine, name, api_key=api_key, max_body_bytes=int(args.max_body_mb * 2**20))
    log.info("serving %s at http://%s:%d/v1 (OpenAI completions)", name, args.host, args.port)
    server.run(app, args.host, args.port, args.shutdown_timeout)


def cmd_eval(args: argparse.Namespace) -> None:
    from griffon.checkpoint import load_for_inference, resolve
    from griffon.eval.documents import eval_documents
    from griffon.eval.score import byte_table, plot_by_position, score_documents

    results = {}
    for name in args.models:
        model, tokenizer = load_for_inference(name, device=args.device)
        ckpt = resolve(name)[0]
        docs = eval_documents(tokenizer, args.data, args.split, [*args.text, *args.jsonl], args.field)
        scores = score_documents(
            model, docs, byte_table(tokenizer), args.seq_len, args.batch_size, args.stride,
            per_doc=args.per_doc, by_position=args.by_position or bool(args.png), max_len=args.max_len,
            progress=sys.stderr.isatty(),
        )  # fmt: skip
        if scores.tokens == 0:
            raise ValueError("nothing to score: every document holds fewer than 2 tokens")
        s = scores.summary()
        how = "sliding window" if model.config.has_global_attention else "whole documents, state carried"
        print(f"{name}: loss {s['loss']:.4f} nats/token, perplexity {s['perplexity']:.3f}, "
              f"{s['bits_per_byte']:.4f} bits/byte on {s['tokens']:,} tokens of {s['documents']} documents ({how})")  # fmt: skip
        results[name] = scores.to_dict() | {"checkpoint": str(ckpt), "seq_len": args.seq_len}
    if args.json:
        text = json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=2)
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(text))
    if args.png:
        plot_by_position(results, args.png, args.train_len)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def cmd_lm_eval(args: argparse.Namespace) -> None:
    try:
        from griffon.eval.harness import main as harness_main
    except ImportError as e:
        raise ValueError(f"griffon lm-eval needs lm-evaluation-harness: pip install 'griffon[eval]' ({e})") from None
    rest = args.lm_eval_args
    harness_main(rest[1:] if rest[:1] == ["--"] else rest)


def cmd_prepare(args: argparse.Namespace) -> None:
    from griffon.data.prepare import prepare
    from griffon.data.tokenizers import load_tokenizer

    meta = prepare(args.inputs, load_tokenizer(args.tokenizer), args.out, args.val_fraction, args.seed, args.field)
    for split, m in meta["splits"].items():
        print(f"{split}: {m['documents']} documents, {m['tokens']:,} tokens, {m['bytes']:,} bytes")


def cmd_verify(args: argparse.Namespace) -> None:
    from griffon.data.prepare import verify

    meta = verify(args.directory)
    tokens = sum(m["tokens"] for m in meta["splits"].values())
    print(f"{args.directory}: {tokens:,} tokens, every shard matches the SHA-256 in meta.json")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from griffon.data.sources import iter_documents
    from griffon.data.tokenizers import train_bpe

    texts = (doc for p in args.inputs for doc in iter_documents(p, args.field))
    tok = train_bpe(texts, args.vocab_size, args.out)
    print(f"wrote {args.out} ({tok.vocab_size} tokens)")


def cmd_sweep(args: argparse.Namespace) -> None:
    from griffon.scaling.sweep import sweep

    sweep(args.spec, args.out, dry_run=args.dry_run, emit_kind=args.emit, only=args.run, collect_only=args.collect)


def cmd_scaling_calibrate(args: argparse.Namespace) -> None:
    from griffon.scaling.calibrate import calibrate
    from griffon.scaling.law import user_law_path

    law = calibrate(args.out, args.law)
    print(f"{law.describe()}\nwritten to {args.law or user_law_path()}")


def cmd_scaling_fit(args: argparse.Namespace) -> None:
    from griffon.scaling.fit import finite_json, fit_table, plot, read_runs, summary

    columns = {c: getattr(args, f"{c}_column") for c in ("params", "tokens", "loss", "flops", "family")}
    runs = read_runs(args.results, columns, args.exclude_top_loss)
    fits = fit_table(runs, args.bootstrap, args.seed)
    print(summary(fits))
    if args.json:
        text = json.dumps(finite_json(fits), indent=2, allow_nan=False)
        atomic_write(Path(args.json), lambda path: path.write_text(text))
    if args.png:
        plot(runs, fits, args.png)


def build_parser() -> argparse.ArgumentParser:
    from griffon.serve import limits
    from griffon.serve.engine import DEFAULT_STEP_TOKENS

    p = argparse.ArgumentParser(prog="griffon", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameter counts and decode-state size of a preset, config or checkpoint")
    s.add_argument("model", help="preset name, config JSON or checkpoint directory")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length for FLOPs and global attention's decode state (default: max_seq_len, else 8192)",
    )
    s.add_argument("--tokens", type=float, default=None, help="also give the training FLOPs for this many tokens")
    s.add_argument(
        "--convention",
        choices=["griffon", "structuredffn"],
        default="griffon",
        help="structuredffn: also count as the StructuredFFN papers do (Table 1 of arXiv 2406.16450)",
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model field, e.g. --set ffn_structure.kind=lowrank --set ffn_structure.rank=512",
    )
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("presets", help="list preset names")
    s.set_defaults(fn=cmd_presets)

    s = sub.add_parser("convert", help="HF RecurrentGemma dir or DeepMind state dict -> griffon checkpoint")
    s.add_argument("src", help="HF directory (config.json + *.safetensors) or DeepMind .pt/.safetensors")
    s.add_argument("dst", help="output directory (must not exist or be empty)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--config", help="DeepMind GriffinConfig fields as JSON (DeepMind sources)")
    g.add_argument("--preset", help="recurrentgemma-2b or recurrentgemma-9b (DeepMind sources)")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("train", help="train a model (no arguments: a small Griffin on the embedded corpus)")
    s.add_argument(
        "config", nargs="?", help="training config JSON or a recipe (structuredffn-s, ...); default: built-in defaults"
    )
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-3 --set model=hawk-tiny")  # fmt: skip
    s.add_argument("--out", default=None, help="run directory, must not hold a run (default: runs/DATE-TIME)")
    s.add_argument("--resume", metavar="RUN",
                   help="continue the run in RUN from its newest checkpoint (--set may change budgets, "
                        "optim.lr and clipping, and bookkeeping such as save_every)")  # fmt: skip
    s.add_argument("--checkpoint", metavar="NAME", help="with --resume: continue from this checkpoint (step_NNNNNN)")
    s.set_defaults(fn=cmd_train)

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
    s.add_argument("--step", choices=STEPS, default="auto",
                   help="decode step: the model's own, fused CPU kernels, torch.compile'd (a minute or so to "
                        "compile, then faster), or CUDA graphs (GPU); auto: fused where it covers the model")  # fmt: skip
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("serve", help="an OpenAI-compatible completions server (needs griffon[serve])")
    s.add_argument("model", help="run directory or checkpoint directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", help="the model's name in the API (default: the directory's name)")
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
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests may go on after SIGTERM/SIGINT before they are aborted")  # fmt: skip
    s.add_argument("--step", choices=STEPS, default="auto", help="decode step (see griffon sample --step)")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("eval", help="loss, perplexity and bits per byte of whole documents")
    s.add_argument("models", nargs="+", help="runs, checkpoints or exported models (several: compared)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--data", help="a prepared data directory (griffon data prepare)")
    src.add_argument("--text", nargs="+", default=[], metavar="FILE", help="text files, one document each")
    src.add_argument("--jsonl", nargs="+", default=[], metavar="FILE", help="JSONL files, one document per line")
    s.add_argument("--split", default="val", choices=["train", "val"], help="with --data: the split (default val)")
    s.add_argument("--field", default="text", help="JSONL field holding the text")
    s.add_argument("--seq-len", type=_positive, default=1024,
                   help="tokens per forward chunk (the cache carries across chunks); global attention: the window")  # fmt: skip
    s.add_argument("--stride", type=_positive, default=None, help="global attention: window stride (default seq-len/2)")
    s.add_argument("--batch-size", type=_positive, default=8, help="documents per batch")
    s.add_argument("--max-len", type=_positive, default=None, help="score only the first N tokens of each document")
    s.add_argument("--per-doc", action="store_true", help="also give each document's scores (in --json)")
    s.add_argument("--by-position", action="store_true", help="loss by token position (log-spaced buckets, in --json)")
    s.add_argument("--png", help="plot loss by position here (implies --by-position)")
    s.add_argument("--train-len", type=_positive, default=None, help="mark this training length in the plot")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", help="write the results here")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("lm-eval", add_help=False,
                       help="lm-evaluation-harness with the griffon model and the offline tasks (needs griffon[eval])")  # fmt: skip
    s.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's own arguments")
    s.set_defaults(fn=cmd_lm_eval)

    s = sub.add_parser("data", help="data preparation")
    dsub = s.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="tokenize text/JSONL/parquet/HF-dataset inputs into token shards")
    d.add_argument("inputs", nargs="+")
    d.add_argument("--tokenizer", default="bytes", help="bytes, a tokenizer.json, or a sentencepiece .model")
    d.add_argument("--out", required=True)
    d.add_argument("--val-fraction", type=float, default=0.1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--field", default="text", help="JSONL/parquet/dataset column holding the text")
    d.set_defaults(fn=cmd_prepare)
    d = dsub.add_parser("verify", help="check a prepared directory's token shards against meta.json's SHA-256")
    d.add_argument("directory")
    d.set_defaults(fn=cmd_verify)

    s = sub.add_parser("tokenizer", help="tokenizers")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer with HF tokenizers")
    t.add_argument("inputs", nargs="+")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--out", required=True, help="output tokenizer.json")
    t.add_argument("--field", default="text")
    t.set_defaults(fn=cmd_tokenizer_train)

    s = sub.add_parser("bench", help="benchmarks that ship with the package")
    bsub = s.add_subparsers(dest="bench_command", required=True)
    import importlib

    from griffon.bench import BENCHMARKS

    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(f"griffon.bench.{module_name}")
        b = bsub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        module.add_arguments(b)
        b.set_defaults(fn=module.run)

    s = sub.add_parser("sweep", help="train the runs of a scaling sweep (resumable), or emit their launch scripts")
    s.add_argument("spec", help="sweep spec, JSON or TOML (see griffon.scaling.sweep)")
    s.add_argument("--out", required=True, help="sweep directory: runs/, results.csv, launch/")
    s.add_argument("--dry-run", action="store_true", help="list the runs with their params, tokens and FLOPs")
    s.add_argument("--emit", choices=["torchrun", "slurm"], help="write one launch script per run instead")
    s.add_argument("--run", help="train this run only (what the launch scripts call)")
    s.add_argument("--collect", action="store_true", help="gather results.csv from the finished runs")
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("scaling", help="scaling-law fits")
    ssub = s.add_subparsers(dest="scaling_command", required=True)
    f = ssub.add_parser("fit", help="frontier, IsoFLOP and L(N, D) fits with bootstrap intervals")
    f.add_argument("results", help="CSV with columns params, tokens, loss (and optionally family, flops)")
    for column in ("params", "tokens", "loss", "flops", "family"):
        f.add_argument(f"--{column}-column", default=column, help=f"the table's column for {column}")
    f.add_argument("--exclude-top-loss", type=int, default=0, help="drop the K highest-loss runs of each family")
    f.add_argument("--bootstrap", type=int, default=100, help="resamples for the intervals (0: none)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--json", help="write the fits here")
    f.add_argument("--png", help="plot loss vs FLOPs, IsoFLOP profiles and N*(C) here")
    f.set_defaults(fn=cmd_scaling_fit)
    c = ssub.add_parser(
        "calibrate", help="fit the scaling law model=auto plans with, on this machine (~25 min on 2 cores)"
    )
    c.add_argument("--out", default="runs/calibration", help="sweep directory (resumable)")
    c.add_argument(
        "--law", default=None, help="write the law here (default: this machine's law file, used by model=auto)"
    )
    c.set_defaults(fn=cmd_scaling_calibrate)

    s = sub.add_parser("export-hf", help="griffon checkpoint -> HF RecurrentGemma directory")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(fn=cmd_export_hf)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from griffon.atomic import describe_os_error
    from griffon.train.signals import TrainingInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm_eval's, options included
        argv = ["lm-eval", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except TrainingInterrupted as e:
        print(f"griffon {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"griffon {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as e:  # ours carry the full story in one line
        print(f"griffon {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is missing, not a directory, not writable, or a full disk
        print(f"griffon {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
