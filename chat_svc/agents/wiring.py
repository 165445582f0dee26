"""The agents' dependencies from settings: clients opened once, closed at shutdown."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from chat_svc.agents.catalog import Agent, build_agents
from chat_svc.agents.monitoring import monitoring_tools
from chat_svc.agents.operations import operations_tools
from chat_svc.agents.tools import Tool
from chat_svc.agents.troubleshooting import troubleshooting_tools
from chat_svc.config import ChatSettings
from chat_svc.logsources import open_log_source
from chat_svc.monitoring import AlertmanagerClient, PrometheusClient
from opsmesh.task.v1 import task_pb2_grpc

_MISSING = {
    "operations": "OPSMESH_TASK_ADDR is not set",
    "monitoring": "OPSMESH_PROMETHEUS_URL and OPSMESH_ALERTMANAGER_URL are not set",
    "troubleshooting": "OPSMESH_LOGS_SOURCE is not set",
}


def _metrics(prometheus: PrometheusClient | None) -> list[Tool[Any]]:
    """The metric queries, so troubleshooting can look at the metrics around a failure."""
    wanted = {"prometheus_query", "prometheus_query_range"}
    return [tool for tool in monitoring_tools(prometheus, None) if tool.name in wanted]


@dataclass
class AgentDependencies:
    """What the agents' tools talk to; ``close`` releases every client this opened."""

    agents: dict[int, Agent]
    _closers: list[Any] = field(default_factory=list)

    @classmethod
    def open(cls, settings: ChatSettings) -> AgentDependencies:
        closers: list[Any] = []
        tasks = None
        if settings.task_address:
            channel = aio.insecure_channel(settings.task_address)
            closers.append(lambda: channel.close(None))
            tasks = task_pb2_grpc.TaskServiceStub(channel)
        prometheus = alertmanager = None
        if settings.prometheus_url:
            prometheus = PrometheusClient(settings.prometheus_url)
            closers.append(prometheus.aclose)
        if settings.alertmanager_url:
            alertmanager = AlertmanagerClient(settings.alertmanager_url)
            closers.append(alertmanager.aclose)
        logs = open_log_source(settings.logs_source)
        if logs is not None:
            closers.append(logs.close)
        agents = build_agents(
            {
                "operations": operations_tools(tasks),
                "monitoring": monitoring_tools(prometheus, alertmanager),
                "troubleshooting": troubleshooting_tools(logs, tasks) + _metrics(prometheus),
            },
            limits=settings.agent_limits,
            missing=_MISSING,
        )
        return cls(agents, closers)

    async def close(self) -> None:
        for close in self._closers:
            await close()
