"""The monitoring agent's tools: read-only PromQL, series, labels, alerts, silences, rules.

Every tool acts in the caller's scope (:class:`chat_svc.monitoring.Scope`): a scoped
caller's PromQL is rewritten to their organization, and alerts, silences and rules are
those labelled with it. No argument names an organization, so the model cannot widen
the scope. Texts are bounded (:data:`MAX_TEXT`); charts and lists go in ``data``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import promql_parser
from pydantic import BaseModel, ConfigDict, Field

from chat_svc.agents.tools import Tool, ToolContext, ToolFailure, ToolOutput, tool
from chat_svc.monitoring import (
    MAX_CHART_POINTS,
    ORG_LABEL,
    AlertmanagerClient,
    PrometheusClient,
    Scope,
    chart_data,
    matcher,
    series_name,
    summarize_instant,
    summarize_range,
)

MAX_TEXT = 6000
MAX_LISTED = 50
MAX_RANGE = timedelta(days=31)
DURATION = r"^([0-9]+(ms|[smhdwy]))+$"
LABEL_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
LABEL_VALUE = r"^[A-Za-z0-9_.:/@+\- ]{1,128}$"


class _Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueryArguments(_Arguments):
    query: str = Field(
        min_length=1, max_length=2000, description="PromQL expression, e.g. sum by (job) (up)"
    )
    time: datetime | None = Field(
        default=None,
        description="Evaluation time, RFC 3339 (e.g. 2025-01-31T12:00:00Z); default now",
    )


class RangeArguments(_Arguments):
    query: str = Field(
        min_length=1,
        max_length=2000,
        description="PromQL expression, e.g. rate(grpc_server_handled_total[5m])",
    )
    range: str = Field(
        default="1h",
        pattern=DURATION,
        max_length=16,
        description="How far back from now, a Prometheus duration: 15m, 1h, 6h, 1d (max 31d)",
    )
    step: str | None = Field(
        default=None,
        pattern=DURATION,
        max_length=16,
        description="Resolution, a Prometheus duration like 1m; default: at most 300 points",
    )


class SeriesArguments(_Arguments):
    match: str = Field(
        min_length=1,
        max_length=500,
        description='Series selector, e.g. up or {__name__=~"grpc_.*",job="opsmesh"}',
    )


class LabelValuesArguments(_Arguments):
    label: str = Field(
        pattern=LABEL_NAME, max_length=128, description="Label name, e.g. job or __name__"
    )
    match: str | None = Field(
        default=None,
        max_length=500,
        description="Optional series selector restricting where values are looked up",
    )


class AlertArguments(_Arguments):
    alertname: str | None = Field(
        default=None, pattern=LABEL_VALUE, description="Only alerts with this alertname"
    )
    severity: str | None = Field(
        default=None, pattern=LABEL_VALUE, description="Only alerts of this severity, e.g. critical"
    )
    include_silenced: bool = Field(
        default=False, description="Also list silenced and inhibited alerts"
    )


class SilenceArguments(_Arguments):
    include_expired: bool = Field(default=False, description="Also list expired silences")


class RuleArguments(_Arguments):
    state: Literal["firing", "pending", "inactive"] | None = Field(
        default=None, description="Only rules in this state"
    )


def duration(text: str) -> timedelta:
    """A Prometheus duration (``1h30m``) as a timedelta, or ToolFailure."""
    try:
        return promql_parser.parse_duration(text)
    except (ValueError, OverflowError) as error:
        raise ToolFailure(f"{text!r} is not a duration like 5m or 1h: {error}") from None


def default_step(span: timedelta, points: int = MAX_CHART_POINTS) -> float:
    """The smallest whole-second step that gives at most ``points`` points over ``span``."""
    return float(max(1, math.ceil(span.total_seconds() / (points - 1))))


def _bounded(text: str) -> str:
    if len(text) <= MAX_TEXT:
        return text
    return text[: MAX_TEXT - 30].rsplit("\n", 1)[0] + "\n... (cut)"


def _scope_line(scope: Scope) -> str:
    return f"(scope: {scope.description})"


def monitoring_tools(
    prometheus: PrometheusClient | None, alertmanager: AlertmanagerClient | None
) -> list[Tool[Any]]:
    """The monitoring tools whose backend is configured."""
    tools: list[Tool[Any]] = []
    if prometheus is not None:
        tools += _prometheus_tools(prometheus)
        tools.append(_rules_tool(prometheus))
    if alertmanager is not None:
        tools += _alertmanager_tools(alertmanager)
    return tools


def _prometheus_tools(prometheus: PrometheusClient) -> list[Tool[Any]]:
    @tool()
    async def prometheus_query(args: QueryArguments, context: ToolContext) -> ToolOutput:
        """Runs an instant PromQL query (the value of each series now, or at `time`).

        Use it for current values: error ratios, queue depths, which targets are up.
        """
        scope = Scope.of(context.principal)
        at = args.time.replace(tzinfo=args.time.tzinfo or UTC) if args.time else None
        data = await prometheus.query(scope.promql(args.query), at)
        text = summarize_instant(data, max_chars=MAX_TEXT - 200)
        return ToolOutput(text=_bounded(f"{args.query} {_scope_line(scope)}\n{text}"))

    @tool()
    async def prometheus_query_range(args: RangeArguments, context: ToolContext) -> ToolOutput:
        """Runs a PromQL query over a time range ending now and charts it.

        Use it for trends: how a rate or latency changed over the last hour or day.
        The answer gives min/avg/max/last per series; the user sees a chart.
        """
        scope = Scope.of(context.principal)
        span = duration(args.range)
        if span > MAX_RANGE or span.total_seconds() <= 0:
            raise ToolFailure(f"range must be between 1s and 31d, not {args.range}")
        step = duration(args.step).total_seconds() if args.step else default_step(span)
        if step <= 0:
            raise ToolFailure("step must be positive")
        end = datetime.now(UTC)
        start = end - span
        data = await prometheus.query_range(scope.promql(args.query), start, end, step)
        text = summarize_range(data, max_chars=MAX_TEXT - 300)
        header = f"{args.query} over the last {args.range}, step {step:g}s {_scope_line(scope)}"
        return ToolOutput(
            text=_bounded(f"{header}\n{text}"),
            data=chart_data(args.query, data, start=start, end=end, step_seconds=step),
        )

    @tool()
    async def prometheus_series(args: SeriesArguments, context: ToolContext) -> ToolOutput:
        """Lists the series (metric name and labels) matching a selector.

        Use it to discover which metrics and labels exist before writing a query.
        """
        scope = Scope.of(context.principal)
        selector = scope.selector(args.match)
        assert selector is not None
        found = await prometheus.series([selector])
        names = sorted(series_name(labels) for labels in found)
        lines = [f"{len(names)} series match {args.match} {_scope_line(scope)}:"]
        lines += names[:MAX_LISTED]
        if len(names) > MAX_LISTED:
            lines.append(f"... and {len(names) - MAX_LISTED} more")
        return ToolOutput(text=_bounded("\n".join(lines)))

    @tool()
    async def prometheus_label_values(
        args: LabelValuesArguments, context: ToolContext
    ) -> ToolOutput:
        """Lists the values a label takes, e.g. every job, or every metric name (__name__)."""
        scope = Scope.of(context.principal)
        selector = scope.selector(args.match)
        values = await prometheus.label_values(
            args.label, [selector] if selector is not None else None
        )
        lines = [f"{len(values)} values of {args.label} {_scope_line(scope)}:"]
        lines += values[: MAX_LISTED * 2]
        if len(values) > MAX_LISTED * 2:
            lines.append(f"... and {len(values) - MAX_LISTED * 2} more")
        return ToolOutput(text=_bounded("\n".join(lines)))

    return [prometheus_query, prometheus_query_range, prometheus_series, prometheus_label_values]


def _alert_line(alert: dict[str, Any]) -> str:
    labels: dict[str, str] = alert.get("labels", {})
    annotations: dict[str, str] = alert.get("annotations", {})
    status = alert.get("status", {})
    state = status.get("state", "active")
    shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "alertname")
    summary = annotations.get("summary") or annotations.get("description") or ""
    line = (
        f"- {labels.get('alertname', '?')} [{labels.get('severity', 'no severity')}] "
        f"since {alert.get('startsAt', '?')} ({shown})"
    )
    if state != "active":
        line += f" {state}"
    return f"{line}: {summary}" if summary else line


def _alertmanager_tools(alertmanager: AlertmanagerClient) -> list[Tool[Any]]:
    @tool()
    async def list_alerts(args: AlertArguments, context: ToolContext) -> ToolOutput:
        """Lists the alerts firing now in Alertmanager (by default not silenced ones).

        Use it first when asked what is wrong or whether anything is alerting.
        """
        scope = Scope.of(context.principal)
        filters = []
        if scope.org_id is not None:
            filters.append(matcher(ORG_LABEL, scope.org_id))
        if args.alertname:
            filters.append(matcher("alertname", args.alertname))
        if args.severity:
            filters.append(matcher("severity", args.severity))
        alerts = await alertmanager.alerts(
            active=True,
            silenced=args.include_silenced,
            inhibited=args.include_silenced,
            filter=filters,
        )
        alerts = [a for a in alerts if scope.allows(a.get("labels", {}))]
        alerts.sort(key=lambda a: (a.get("labels", {}).get("alertname", ""), a.get("startsAt", "")))
        kind = "alerts (silenced included)" if args.include_silenced else "alerts firing"
        lines = [f"{len(alerts)} {kind} {_scope_line(scope)}" + (":" if alerts else ".")]
        lines += [_alert_line(a) for a in alerts[:MAX_LISTED]]
        if len(alerts) > MAX_LISTED:
            lines.append(f"... and {len(alerts) - MAX_LISTED} more")
        listed = [
            {
                "name": a.get("labels", {}).get("alertname", ""),
                "state": a.get("status", {}).get("state", ""),
                "severity": a.get("labels", {}).get("severity", ""),
                "labels": a.get("labels", {}),
                "annotations": a.get("annotations", {}),
                "starts_at": a.get("startsAt", ""),
                "silenced_by": a.get("status", {}).get("silencedBy", []),
            }
            for a in alerts[:MAX_LISTED]
        ]
        return ToolOutput(
            text=_bounded("\n".join(lines)), data={"kind": "alerts", "alerts": listed}
        )

    @tool()
    async def list_silences(args: SilenceArguments, context: ToolContext) -> ToolOutput:
        """Lists the silences in Alertmanager: which alerts are muted, by whom, until when."""
        scope = Scope.of(context.principal)
        silences = [s for s in await alertmanager.silences() if scope.allows_silence(s)]
        if not args.include_expired:
            silences = [s for s in silences if s.get("status", {}).get("state") != "expired"]
        silences.sort(key=lambda s: str(s.get("endsAt", "")))
        lines = [f"{len(silences)} silences {_scope_line(scope)}" + (":" if silences else ".")]
        for silence in silences[:MAX_LISTED]:
            matchers = ", ".join(
                f"{m.get('name')}{_operator(m)}{m.get('value')!r}"
                for m in silence.get("matchers", [])
            )
            lines.append(
                f"- silence {silence.get('id', '?')}: "
                f"{silence.get('status', {}).get('state', '?')} until {silence.get('endsAt')} "
                f"by {silence.get('createdBy', '?')}: {matchers} "
                f"({silence.get('comment', '')})"
            )
        if len(silences) > MAX_LISTED:
            lines.append(f"... and {len(silences) - MAX_LISTED} more")
        return ToolOutput(text=_bounded("\n".join(lines)))

    return [list_alerts, list_silences]


def _operator(matcher_: dict[str, Any]) -> str:
    equal = matcher_.get("isEqual", True)
    if matcher_.get("isRegex"):
        return "=~" if equal else "!~"
    return "=" if equal else "!="


def _rules_tool(prometheus: PrometheusClient) -> Tool[Any]:
    @tool()
    async def list_alert_rules(args: RuleArguments, context: ToolContext) -> ToolOutput:
        """Lists Prometheus' alerting rules with their state (firing, pending, inactive).

        Use it to see what is being watched and which conditions are close to alerting.
        """
        scope = Scope.of(context.principal)
        rules = [r for r in await prometheus.rules() if scope.allows(r.get("labels", {}))]
        if args.state:
            rules = [r for r in rules if r.get("state") == args.state]
        order = {"firing": 0, "pending": 1, "inactive": 2}
        rules.sort(key=lambda r: (order.get(r.get("state", ""), 3), r.get("name", "")))
        what = f"{args.state} alerting rules" if args.state else "alerting rules"
        lines = [f"{len(rules)} {what} {_scope_line(scope)}" + (":" if rules else ".")]
        for rule in rules[:MAX_LISTED]:
            severity = rule.get("labels", {}).get("severity", "no severity")
            wait = f", for {rule['duration']:g}s" if rule.get("duration") else ""
            active = len(rule.get("alerts", []))
            lines.append(
                f"- {rule.get('name')} [{severity}] {rule.get('state')}"
                f"{f' ({active} active)' if active else ''}{wait}: {rule.get('query')}"
            )
        if len(rules) > MAX_LISTED:
            lines.append(f"... and {len(rules) - MAX_LISTED} more")
        return ToolOutput(text=_bounded("\n".join(lines)))

    return list_alert_rules
