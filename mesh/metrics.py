"""Prometheus metrics per RPC: count by code, latency histogram, in flight.

Names follow go-grpc-prometheus so existing dashboards work. Each server gets
its own registry (several servers may share a process, e.g. in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class MethodMetrics:
    """Pre-bound metric children for one method (no label lookups on the hot path)."""

    in_flight: Any
    latency: Any
    handled: Any  # Counter with the grpc_code label still open

    def record(self, code_name: str, seconds: float) -> None:
        self.latency.observe(seconds)
        self.handled.labels(grpc_code=code_name).inc()


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._started = Counter(
            "grpc_server_started_total",
            "RPCs started on the server.",
            ["grpc_type", "grpc_service", "grpc_method"],
            registry=registry,
        )
        self._handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self._latency = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status.",
            ["grpc_type", "grpc_service", "grpc_method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._in_flight = Gauge(
            "grpc_server_in_flight",
            "RPCs being handled right now.",
            ["grpc_type", "grpc_service", "grpc_method"],
            registry=registry,
        )
        self._cache: dict[str, tuple[MethodMetrics, Any]] = {}

    def for_method(self, full_method: str, rpc_type: str) -> tuple[MethodMetrics, Any]:
        """Metric children for ``/package.Service/Method`` and its started counter."""
        cached = self._cache.get(full_method)
        if cached is None:
            service, _, method = full_method.lstrip("/").rpartition("/")
            labels = {"grpc_type": rpc_type, "grpc_service": service, "grpc_method": method}
            cached = (
                MethodMetrics(
                    in_flight=self._in_flight.labels(**labels),
                    latency=self._latency.labels(**labels),
                    handled=_PartialCounter(self._handled, labels),
                ),
                self._started.labels(**labels),
            )
            self._cache[full_method] = cached
        return cached


class _PartialCounter:
    """A counter with all labels but ``grpc_code`` bound, caching each code's child."""

    def __init__(self, counter: Counter, labels: dict[str, str]) -> None:
        self._counter = counter
        self._labels = labels
        self._children: dict[str, Any] = {}

    def labels(self, *, grpc_code: str) -> Any:
        child = self._children.get(grpc_code)
        if child is None:
            child = self._counter.labels(**self._labels, grpc_code=grpc_code)
            self._children[grpc_code] = child
        return child
