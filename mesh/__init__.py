"""Shared runtime of every opsmesh service.

Settings from the environment, the gRPC server bootstrap (health, reflection,
graceful drain), JSON logs with request ids, per-RPC Prometheus metrics, the
caller's identity, and the one place that maps domain errors to gRPC status
codes. Services receive what they need through constructors; nothing here keeps
module-level state wired by a ``__main__``.
"""
