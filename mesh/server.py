"""gRPC server bootstrap shared by every service.

A :class:`ServiceRunner` owns one ``grpc.aio`` server with the RPC interceptor,
``grpc.health.v1`` fed by a :class:`~mesh.health.HealthMonitor`, server
reflection (so ``grpcurl list`` works) and a Prometheus endpoint. Stopping it
(SIGTERM/SIGINT through :meth:`serve_until_signalled`) drains gracefully:
health goes NOT_SERVING, new RPCs are refused after ``drain_delay``, in-flight
RPCs get ``grace_period`` to finish, then the server stops.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from grpc import aio
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from mesh import errors
from mesh.auth import Authenticator
from mesh.health import HealthMonitor, Probe
from mesh.metrics import RpcMetrics
from mesh.reflection import enable_reflection
from mesh.rpc import RpcInterceptor, WireCodecInterceptor
from mesh.settings import ServerSettings, SettingsError
from mesh.settingsdoc import parse_command_line

log = logging.getLogger("opsmesh.server")


@dataclass(frozen=True, kw_only=True)
class Registration:
    """One gRPC service to serve: its full name and how to add it to a server."""

    service_name: str
    add_to_server: Callable[[aio.Server], None]

    @classmethod
    def of(
        cls, service_name: str, servicer: Any, add: Callable[[Any, aio.Server], None]
    ) -> Registration:
        """A generated ``add_XServicer_to_server`` applied to ``servicer``."""
        return cls(service_name=service_name, add_to_server=lambda server: add(servicer, server))


@dataclass(frozen=True, kw_only=True)
class RunnerOptions:
    health_interval: float = 2.0
    health_timeout: float = 1.0
    on_start: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=tuple)
    """Called after the server started, in order (side servers such as webhooks)."""
    on_stop: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=tuple)
    """Called after the server stopped, in order (close clients, flush buffers)."""

    def extended(
        self,
        *,
        on_start: Sequence[Callable[[], Awaitable[None]]] = (),
        on_stop: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> RunnerOptions:
        """These options with a service's own start and stop steps added after the caller's."""
        return replace(
            self,
            on_start=(*self.on_start, *on_start),
            on_stop=(*self.on_stop, *on_stop),
        )


class ServiceRunner:
    def __init__(
        self,
        *,
        settings: ServerSettings,
        registrations: Sequence[Registration],
        authenticator: Authenticator,
        probes: Sequence[Probe] = (),
        options: RunnerOptions | None = None,
        registry: CollectorRegistry | None = None,
        health: Any = None,
        reflected: Sequence[str] = (),
    ) -> None:
        """``health``: the ``grpc.health.v1`` servicer (default: a status board the probes
        set); ``reflected``: more service names reflection lists than the registrations'."""
        self._settings = settings
        if settings.strict_error_reasons:
            # Process-wide on purpose: every error the process maps must use a declared reason.
            errors.STRICT_REASONS = True
        self._registrations = tuple(registrations)
        self._options = options or RunnerOptions()
        self.registry = registry or CollectorRegistry()
        self.metrics = RpcMetrics(self.registry)
        limits = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self._server = aio.server(
            interceptors=[
                RpcInterceptor(
                    authenticator=authenticator,
                    metrics=self.metrics,
                    access_log=settings.access_log,
                ),
                # Inside the RPC interceptor: requests decode within each RPC's lifecycle.
                WireCodecInterceptor(),
            ],
            options=limits,
        )
        # grpc-stubs' grpc_health stubs predate the asyncio servicer.
        self._health = health or grpc_health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._reflected = tuple(reflected)
        self._monitor = HealthMonitor(
            self._health,
            service_names=[r.service_name for r in self._registrations],
            probes=probes,
            interval=self._options.health_interval,
            timeout=self._options.health_timeout,
        )
        self._monitor_task: asyncio.Task[None] | None = None
        self._metrics_server: Any = None
        self._stop_requested = asyncio.Event()
        self._stopped = False
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        for registration in self._registrations:
            registration.add_to_server(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [r.service_name for r in self._registrations]
        enable_reflection(
            (
                *names,
                *self._reflected,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            ),
            self._server,
        )
        address = f"{self._settings.host}:{self._settings.port}"
        self.port = self._server.add_insecure_port(address)
        # Health starts NOT_SERVING until the first probe round says otherwise.
        for name in ("", *names):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        await self._monitor.check_once()
        self._monitor_task = asyncio.create_task(self._monitor.run(), name="health-monitor")
        for callback in self._options.on_start:
            await callback()
        if self._settings.metrics_port > 0:
            self._metrics_server, _ = start_http_server(
                self._settings.metrics_port, addr=self._settings.host, registry=self.registry
            )
            self.metrics_port = self._metrics_server.server_port
        log.info(
            "serving %s on %s:%d",
            ", ".join(names) or "health and reflection",
            self._settings.host,
            self.port,
            extra={"grpc_port": self.port, "metrics_port": self.metrics_port},
        )

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def stop(self) -> None:
        """Drains in-flight RPCs and stops; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        log.info(
            "draining: health NOT_SERVING, in-flight RPCs get %.1fs", self._settings.grace_period
        )
        await self._monitor.shut_down()
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
        if self._settings.drain_delay > 0:
            await asyncio.sleep(self._settings.drain_delay)
        await self._server.stop(self._settings.grace_period)
        for callback in self._options.on_stop:
            try:
                await callback()
            except Exception:
                log.exception("shutdown step failed")
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("stopped")

    async def serve_until_signalled(self) -> None:
        """Starts, serves until SIGTERM or SIGINT, then drains and stops."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            _freeze_startup_objects()
            await self._stop_requested.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()


def _freeze_startup_objects() -> None:
    """Moves what start-up built (modules, wiring, caches: most of a service's objects, and
    they live as long as it) out of the cyclic collector's sight, so its full collections stop
    walking them again and again (in chat_svc that walk was a fifth of its CPU per request)."""
    gc.collect()
    gc.freeze()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Runs a service's main coroutine, on uvloop where it is installed (faster socket I/O)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        asyncio.run(main)
        return
    uvloop.run(main)


def run_main(
    name: str,
    serve: Callable[[Mapping[str, str]], Coroutine[Any, Any, None]],
    settings: type[Any],
) -> None:
    """A service's ``main``: serve with the process environment; bad settings exit with 2.

    ``--help`` prints the service's settings (those ``settings`` declares) and exits before
    anything connects.
    """
    parse_command_line(serve.__module__, settings)
    try:
        run(serve(os.environ))
    except SettingsError as error:
        print(f"{name}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
