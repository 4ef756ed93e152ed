"""Prometheus metrics of the server, in the text exposition format (no
client library): request and error counters, queue depth, busy workers, and
histograms of time to first token and decode tokens/s."""
from __future__ import annotations

import threading
from collections import Counter

TTFT_BUCKETS_MS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts = buckets, [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.3f}",
                f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # by status code
        self.cancelled = 0  # generations stopped because the client went away
        self.ttft = Histogram(TTFT_BUCKETS_MS)
        self.tps = Histogram(TPS_BUCKETS)

    def count(self, status: int) -> None:
        with self._lock:
            self.requests[status] += 1

    def count_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def observe_generation(self, timings: dict) -> None:
        with self._lock:
            if "ttft_ms" in timings:
                self.ttft.observe(timings["ttft_ms"])
            if timings.get("tokens_per_s"):
                self.tps.observe(timings["tokens_per_s"])

    def render(self, queue_depth: int, busy: int, workers: int) -> str:
        with self._lock:
            out = ["# TYPE vlmedge_requests_total counter"]
            out += [f'vlmedge_requests_total{{status="{s}"}} {n}'
                    for s, n in sorted(self.requests.items())]
            errors = sum(n for s, n in self.requests.items() if s >= 400)
            out += ["# TYPE vlmedge_errors_total counter", f"vlmedge_errors_total {errors}",
                    "# TYPE vlmedge_cancelled_total counter",
                    f"vlmedge_cancelled_total {self.cancelled}",
                    "# TYPE vlmedge_queue_depth gauge", f"vlmedge_queue_depth {queue_depth}",
                    "# TYPE vlmedge_busy_workers gauge", f"vlmedge_busy_workers {busy}",
                    "# TYPE vlmedge_workers gauge", f"vlmedge_workers {workers}"]
            out += self.ttft.lines("vlmedge_ttft_ms") + self.tps.lines("vlmedge_tokens_per_s")
        return "\n".join(out) + "\n"
