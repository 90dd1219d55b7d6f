"""The engine's counters and latency histograms, rendered in Prometheus' text format."""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

# Histogram bucket upper bounds, seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Output tokens/s is averaged over this many seconds.
RATE_WINDOW = 10.0


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        return lines + [f"{name}_sum {self.total}", f"{name}_count {self.n}"]


@dataclass
class Metrics:
    """What the engine counts. Written by the engine's thread; read by ``/metrics``."""

    queue_length: int = 0
    running: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests: dict[str, int] = field(default_factory=dict)  # finished requests by finish reason
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    _recent: deque = field(default_factory=deque)  # (time, generation_tokens) samples

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_tpot(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def tokens_per_second(self, now: float | None = None) -> float:
        """Output tokens per second over the last :data:`RATE_WINDOW` seconds."""
        now = time.monotonic() if now is None else now
        self._recent.append((now, self.generation_tokens))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW:
            self._recent.popleft()
        t0, n0 = self._recent[0]
        return (self.generation_tokens - n0) / (now - t0) if now > t0 else 0.0

    def render(self, prefix_lookups: int, prefix_hits: int, rejected: dict[str, int] | None = None) -> str:
        """Prometheus exposition text (version 0.0.4); ``rejected`` counts refused HTTP requests by reason."""
        rate = prefix_hits / prefix_lookups if prefix_lookups else 0.0
        lines = [
            "# HELP griffon_queue_length Requests waiting for a slot.",
            "# TYPE griffon_queue_length gauge",
            f"griffon_queue_length {self.queue_length}",
            "# HELP griffon_running_requests Requests prefilling or decoding.",
            "# TYPE griffon_running_requests gauge",
            f"griffon_running_requests {self.running}",
            "# HELP griffon_generation_tokens_per_second Output tokens per second, last 10 s.",
            "# TYPE griffon_generation_tokens_per_second gauge",
            f"griffon_generation_tokens_per_second {self.tokens_per_second():.3f}",
            "# HELP griffon_generation_tokens_total Output tokens generated.",
            "# TYPE griffon_generation_tokens_total counter",
            f"griffon_generation_tokens_total {self.generation_tokens}",
            "# HELP griffon_prompt_tokens_total Prompt tokens prefilled or restored.",
            "# TYPE griffon_prompt_tokens_total counter",
            f"griffon_prompt_tokens_total {self.prompt_tokens}",
            "# HELP griffon_prefix_cache_hit_rate Prompts that resumed from a cached prefix state.",
            "# TYPE griffon_prefix_cache_hit_rate gauge",
            f"griffon_prefix_cache_hit_rate {rate:.4f}",
            "# HELP griffon_requests_total Finished requests by reason.",
            "# TYPE griffon_requests_total counter",
        ]
        lines += [f'griffon_requests_total{{reason="{k}"}} {v}' for k, v in sorted(self.requests.items())]
        lines += [
            "# HELP griffon_rejected_requests_total HTTP requests refused before running, by reason.",
            "# TYPE griffon_rejected_requests_total counter",
        ]
        lines += [f'griffon_rejected_requests_total{{reason="{k}"}} {v}' for k, v in sorted((rejected or {}).items())]
        lines += self.ttft.render("griffon_time_to_first_token_seconds", "Time to first token.")
        lines += self.tpot.render(
            "griffon_time_per_output_token_seconds", "Mean time per output token after the first."
        )
        return "\n".join(lines) + "\n"
