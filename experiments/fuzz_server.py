"""Fuzz ``griffon serve`` from its own OpenAPI schema, as users of OpenAPI tools do (schemathesis).

    python experiments/fuzz_server.py --examples 2000 --json docs/results/fuzz_server.json

Starts the server on loopback over a tiny random-weight Griffin with small limits, then for every
operation in the schema lets schemathesis generate requests that follow the schema (positive) and
requests that break it (negative), up to ``--examples`` of each, and checks every answer: no 5xx,
a status code and a content type the schema documents, a body that conforms to the documented
schema (errors included), schema-breaking requests refused with a 4xx, and an answer within
``--timeout`` seconds (no hang). Schema-valid requests may still be refused with a 400 where the
server checks what a schema cannot say (token ids inside the vocabulary, the limits, ``max_tokens=0``
only with ``echo``), so schemathesis's positive-data-acceptance check is left out. Afterwards the
server must still answer ``/health`` and a completion. Operations without parameters or body (the
GETs) have one request to generate and none that breaks the schema; they are sent that once.

The test suite runs this with a few hundred examples per mode (tests/test_serve_http.py); the
longer run's result is in docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import time

import httpx
import schemathesis
import torch
from hypothesis import HealthCheck, given, seed, settings

from griffon import Griffon
from griffon.atomic import atomic_write_json
from griffon.config import ModelConfig
from griffon.data.tokenizers import ByteTokenizer
from griffon.engine import Engine
from griffon.engine.limits import Limits
from griffon.machine import machine
from griffon.serve.server import BackgroundServer, create_app


def tiny_app():
    """The server under test: a tiny random-weight Griffin, byte tokens, small limits."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=256, width=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_width=48, attention_window=8
    )
    limits = Limits(max_prompt_tokens=64, max_tokens=16, max_logprob_entries=2000, request_timeout=30)
    engine = Engine(Griffon(cfg).eval(), ByteTokenizer(), max_queue=32, prefill_chunk=16, step="model", limits=limits)
    return create_app(engine, "tiny", max_body_bytes=64 * 1024)


def _run(op, mode, url: str, examples: int, timeout: float, random_seed: int) -> dict[int, int]:
    """Up to ``examples`` generated requests to one operation in one mode; the status codes seen."""
    statuses: dict[int, int] = {}
    excluded = [schemathesis.checks.positive_data_acceptance]

    @seed(random_seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(op.as_strategy(generation_mode=mode))
    def check(case) -> None:
        response = case.call(base_url=url, timeout=timeout)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        # A body over max_body_bytes (a schema-breaking list past its maxItems, say) is refused with
        # 413 before it is parsed: a rejection all the same, which schemathesis does not count as one.
        too_large = [schemathesis.checks.negative_data_rejection] if response.status_code == 413 else []
        case.validate_response(response, excluded_checks=[*excluded, *too_large])

    check()
    return statuses


def fuzz(app, url: str, examples: int, timeout: float, random_seed: int = 0) -> dict:
    """Run the checks (module docstring) against ``app`` served at ``url``; return per operation
    and mode the number of requests and the status codes seen. Raises on the first failure."""
    schema = schemathesis.openapi.from_dict(app.openapi())
    report = {}
    for result in schema.get_all_operations():
        op = result.ok()
        has_input = any(len(x) for x in (op.body, op.query, op.headers, op.path_parameters, op.cookies))
        for mode in schemathesis.GenerationMode if has_input else [schemathesis.GenerationMode.POSITIVE]:
            t0 = time.monotonic()
            statuses = _run(op, mode, url, examples, timeout, random_seed)
            report[f"{op.label} ({mode.value})"] = {
                "requests": sum(statuses.values()),
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "seconds": round(time.monotonic() - t0, 1),
            }
    with httpx.Client(base_url=url, timeout=timeout) as http:  # still serving
        assert http.get("/health").json()["status"] == "ok"
        r = http.post("/v1/completions", json={"prompt": "still there?", "max_tokens": 4})
        assert r.status_code == 200, r.text
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=2000, help="requests generated per operation and mode (at most)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds an answer may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args()
    app = tiny_app()
    with BackgroundServer(app) as url:
        t0 = time.monotonic()
        report = fuzz(app, url, args.examples, args.timeout, args.seed)
        seconds = time.monotonic() - t0
    out = {
        "command": f"python experiments/fuzz_server.py --examples {args.examples} --seed {args.seed}",
        "machine": machine(),
        "schemathesis": schemathesis.SCHEMATHESIS_VERSION,
        "seconds": round(seconds, 1),
        "operations": report,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        atomic_write_json(args.json, out)


if __name__ == "__main__":
    main()
