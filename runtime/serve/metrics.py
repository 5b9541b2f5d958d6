"""``GET /metrics``: Prometheus text format (exposition format 0.0.4), no client library.

Two sources: the ingress's own counters (requests by route and status, a latency histogram per
route, measured around the whole answer including the adapters' encoding), and each model's
generation replica (``/health`` figures: queue length, active requests, UNet calls and rows per
call). With several replicas per model the replica figures come from whichever replica Ray
routes the probe to; Ray Serve's own metrics (``ray_serve_*`` on Ray's metrics port) cover the
per-replica view.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

#: latency buckets (seconds): a 1-step tiny model answers in ms, a 50-step SDXL in tens of s
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The ingress's counters and histograms (thread-safe; one per ingress replica)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._hist: dict[str, list[int]] = {}
        self._sum: dict[str, float] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (route, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            counts = self._hist.setdefault(route, [0] * (len(BUCKETS) + 1))
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sum[route] = self._sum.get(route, 0.0) + seconds

    def render(self, replicas: dict[str, dict[str, Any] | None]) -> str:
        """The exposition text; ``replicas``: model name -> its replica's /health JSON (None
        when it did not answer)."""
        out: list[str] = []
        out += [
            "# HELP trt_sd_requests_total HTTP requests answered by the ingress.",
            "# TYPE trt_sd_requests_total counter",
        ]
        with self._lock:
            requests = dict(self._requests)
            hist = {k: list(v) for k, v in self._hist.items()}
            sums = dict(self._sum)
        for (route, code), n in sorted(requests.items()):
            out.append(f'trt_sd_requests_total{{route="{_label(route)}",code="{code}"}} {n}')
        out += [
            "# HELP trt_sd_request_seconds Time from request to answer at the ingress.",
            "# TYPE trt_sd_request_seconds histogram",
        ]
        for route, counts in sorted(hist.items()):
            r = _label(route)
            running = 0
            for le, n in zip((*BUCKETS, float("inf")), counts, strict=True):
                running += n
                le_text = "+Inf" if le == float("inf") else f"{le:g}"
                out.append(f'trt_sd_request_seconds_bucket{{route="{r}",le="{le_text}"}} {running}')
            out.append(f'trt_sd_request_seconds_sum{{route="{r}"}} {sums[route]:.6f}')
            out.append(f'trt_sd_request_seconds_count{{route="{r}"}} {running}')
        gauges = {
            "trt_sd_up": ("gauge", "1 when the model's replica answered its health probe."),
            "trt_sd_queue_waiting": ("gauge", "Requests waiting for a batch slot."),
            "trt_sd_active_requests": ("gauge", "Requests being denoised."),
            "trt_sd_unet_calls_total": ("counter", "UNet engine calls."),
            "trt_sd_unet_rows_total": ("counter", "Rows (CFG halves included) in UNet calls."),
            "trt_sd_completed_total": ("counter", "Requests finished with an image."),
            "trt_sd_rejected_total": ("counter", "Requests refused with a full queue (429)."),
        }
        values: dict[str, list[str]] = {name: [] for name in gauges}
        rows_lines: list[str] = []
        for model, status in sorted(replicas.items()):
            m = _label(model)
            up = status is not None and status.get("status") == "ok"
            values["trt_sd_up"].append(f'trt_sd_up{{model="{m}"}} {int(up)}')
            if status is None:
                continue
            stats: dict[str, Any] = status.get("stats") or {}
            for name, value in (
                ("trt_sd_queue_waiting", status.get("waiting", 0)),
                ("trt_sd_active_requests", status.get("active", 0)),
                ("trt_sd_unet_calls_total", stats.get("unet_calls", 0)),
                ("trt_sd_unet_rows_total", stats.get("unet_rows", 0)),
                ("trt_sd_completed_total", stats.get("completed", 0)),
                ("trt_sd_rejected_total", stats.get("rejected", 0)),
            ):
                values[name].append(f'{name}{{model="{m}"}} {value}')
            for rows, n in stats.get("rows_per_call", {}).items():
                rows_lines.append(f'trt_sd_unet_calls_by_rows{{model="{m}",rows="{rows}"}} {n}')
        for name, (kind, text) in gauges.items():
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *values[name]]
        out += [
            "# HELP trt_sd_unet_calls_by_rows UNet calls by batch rows.",
            "# TYPE trt_sd_unet_calls_by_rows counter",
            *rows_lines,
        ]
        return "\n".join(out) + "\n"
