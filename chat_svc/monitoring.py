"""The monitoring agent's backend: tenant-scoped PromQL, Prometheus and Alertmanager clients,
and summaries of their answers small enough for a model's context.

Tenancy works like prom-label-proxy: every vector and matrix selector of a scoped
caller's query gets an ``org_id="<org>"`` matcher, replacing any ``org_id`` matcher
the query had, so no function, operator, subquery or regex can reach another
organization's series. Platform roles (mesh.context.PLATFORM_ROLES) see the whole platform
unchanged; an organization's own admins and operators do not.

Non-finite sample values: Prometheus writes them as ``"NaN"``, ``"+Inf"`` and
``"-Inf"``; JSON and protobuf ``Struct`` cannot carry NaN or infinities as numbers.
In chart data a NaN point is ``null`` (a gap) and an infinite one keeps Prometheus'
own string ``"+Inf"`` / ``"-Inf"``; every other value is a number. Text summaries
print them as Prometheus does and leave them out of min/avg/max.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import promql_parser

from chat_svc.agents.tools import ToolFailure, visible_org
from mesh.context import Principal

ORG_LABEL = "org_id"
"""Roles that see every organization's series, alerts and rules."""

MAX_CHART_SERIES = 20
MAX_CHART_POINTS = 300

Point = float | str | None
"""A chart value: a number, ``None`` for NaN, ``"+Inf"`` / ``"-Inf"``."""


# --- tenancy -----------------------------------------------------------------------------


def _quoted(value: str) -> str:
    """``value`` escaped for a PromQL double-quoted string (the parser's renderer does not)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def _children(node: Any) -> list[Any]:
    if isinstance(node, promql_parser.MatrixSelector):
        return [node.vector_selector]
    if isinstance(node, promql_parser.Call):
        return list(node.args)
    if isinstance(node, promql_parser.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, promql_parser.AggregateExpr):
        return [node.expr] if node.param is None else [node.param, node.expr]
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr):
        return [node.expr]
    if isinstance(node, promql_parser.SubqueryExpr):
        if node.step is None:
            raise ToolFailure(
                "give the subquery an explicit resolution, e.g. [30m:1m] instead of [30m:]"
            )
        return [node.expr]
    return []


def _rewrite(node: Any, org_id: str | None) -> int:
    """Scopes (or, with ``org_id`` None, only re-quotes) every selector in place; their count."""
    count = 0
    if isinstance(node, promql_parser.VectorSelector):
        if node.matchers.or_matchers:
            raise ToolFailure("'or' inside a selector's braces is not supported here")
        matchers = [
            promql_parser.Matcher(m.op, m.name, _quoted(m.value))
            for m in node.matchers.matchers
            if org_id is None or m.name != ORG_LABEL
        ]
        if org_id is not None:
            matchers.append(
                promql_parser.Matcher(promql_parser.MatchOp.Equal, ORG_LABEL, _quoted(org_id))
            )
        node.matchers = promql_parser.Matchers(matchers)
        count += 1
    elif isinstance(node, promql_parser.StringLiteral):
        node.val = _quoted(node.val)
    for child in _children(node):
        count += _rewrite(child, org_id)
    return count


def _parse(query: str) -> Any:
    try:
        return promql_parser.parse(query)
    except (ValueError, RuntimeError) as error:
        raise ToolFailure(f"not a valid PromQL query: {error}") from None


def _selectors(node: Any) -> list[Any]:
    found = [node] if isinstance(node, promql_parser.VectorSelector) else []
    for child in _children(node):
        found += _selectors(child)
    return found


def scope_promql(query: str, org_id: str) -> str:
    """``query`` with ``org_id="<org_id>"`` enforced on every vector and matrix selector.

    The rendered query is parsed again and checked: each selector must carry exactly one
    ``org_id`` matcher, an equality with ``org_id``, or the query is refused. That check
    does not trust the parser's renderer, whose output is what Prometheus runs.
    """
    if not org_id:
        raise ToolFailure("no organization to scope the query to")
    expression = _parse(query)
    selectors = _rewrite(expression, org_id)
    scoped = str(expression)
    checked = _parse(scoped)
    found = _selectors(checked)
    for selector in found:
        org_matchers = [m for m in selector.matchers.matchers if m.name == ORG_LABEL]
        if len(org_matchers) != 1 or (
            org_matchers[0].op != promql_parser.MatchOp.Equal or org_matchers[0].value != org_id
        ):
            raise ToolFailure("the query could not be scoped to your organization")
    if len(found) != selectors:
        raise ToolFailure("the query could not be scoped to your organization")
    return scoped


@dataclass(frozen=True, kw_only=True)
class Scope:
    """What a caller may see: one organization, or the platform (``org_id`` None)."""

    org_id: str | None

    @classmethod
    def of(cls, principal: Principal) -> Scope:
        return cls(org_id=visible_org(principal))

    @property
    def description(self) -> str:
        return "the whole platform" if self.org_id is None else f"organization {self.org_id}"

    def promql(self, query: str) -> str:
        """The query as this caller may run it (validated even when unscoped)."""
        if self.org_id is None:
            _parse(query)
            return query
        return scope_promql(query, self.org_id)

    def selector(self, match: str | None) -> str | None:
        """A series selector for the series/label APIs, scoped; None is 'any series'."""
        if match is None:
            return None if self.org_id is None else f'{{{ORG_LABEL}="{_quoted(self.org_id)}"}}'
        if not isinstance(_parse(match), promql_parser.VectorSelector):
            raise ToolFailure(f'{match!r} is not a series selector like up{{job="x"}}')
        return self.promql(match)

    def allows(self, labels: Mapping[str, Any]) -> bool:
        return self.org_id is None or labels.get(ORG_LABEL) == self.org_id

    def allows_silence(self, silence: Mapping[str, Any]) -> bool:
        """A silence is an organization's when it matches ``org_id`` exactly to that org."""
        if self.org_id is None:
            return True
        return any(
            m.get("name") == ORG_LABEL
            and m.get("value") == self.org_id
            and not m.get("isRegex", False)
            and m.get("isEqual", True)
            for m in silence.get("matchers", [])
        )


# --- HTTP clients ------------------------------------------------------------------------


class _Http:
    def __init__(self, what: str, base_url: str, timeout: float) -> None:
        self._what = what
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        try:
            reply = await self._client.request(method, path, params=list(params))
        except httpx.TimeoutException as error:
            raise ToolFailure(
                f"{self._what} at {self.base_url} is unreachable: timed out "
                f"({type(error).__name__})"
            ) from None
        except httpx.HTTPError as error:
            raise ToolFailure(
                f"{self._what} at {self.base_url} is unreachable: {error or type(error).__name__}"
            ) from None
        try:
            body = reply.json()
        except ValueError:
            body = None
        return self._unwrap(reply, body)

    def _unwrap(self, reply: httpx.Response, body: Any) -> Any:
        raise NotImplementedError


class PrometheusClient(_Http):
    """Prometheus' HTTP API (``/api/v1``): what the monitoring tools read."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        super().__init__("Prometheus", base_url, timeout)

    def _unwrap(self, reply: httpx.Response, body: Any) -> Any:
        if isinstance(body, dict) and body.get("status") == "error":
            raise ToolFailure(
                f"Prometheus refused it ({body.get('errorType', 'error')}): {body.get('error')}"
            )
        if reply.status_code >= 400 or not isinstance(body, dict):
            raise ToolFailure(
                f"Prometheus at {self.base_url} answered HTTP {reply.status_code}: "
                f"{reply.text[:300]}"
            )
        return body.get("data")

    async def query(self, promql: str, at: datetime | None = None) -> dict[str, Any]:
        params = [("query", promql)]
        if at is not None:
            params.append(("time", _unix(at)))
        data: dict[str, Any] = await self._request("POST", "/api/v1/query", params)
        return data

    async def query_range(
        self, promql: str, start: datetime, end: datetime, step_seconds: float
    ) -> dict[str, Any]:
        params = [
            ("query", promql),
            ("start", _unix(start)),
            ("end", _unix(end)),
            ("step", f"{step_seconds:g}"),
        ]
        data: dict[str, Any] = await self._request("POST", "/api/v1/query_range", params)
        return data

    async def series(
        self, match: Sequence[str], start: datetime | None = None, end: datetime | None = None
    ) -> list[dict[str, str]]:
        params = [("match[]", m) for m in match] + _window(start, end)
        data: list[dict[str, str]] = await self._request("POST", "/api/v1/series", params)
        return data

    async def label_values(
        self,
        label: str,
        match: Sequence[str] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[str]:
        params = [("match[]", m) for m in match or ()] + _window(start, end)
        data: list[str] = await self._request("GET", f"/api/v1/label/{label}/values", params)
        return data

    async def rules(self) -> list[dict[str, Any]]:
        """Alerting rules with their state, each with ``group`` (its group's name) added."""
        data = await self._request("GET", "/api/v1/rules", [("type", "alert")])
        rules: list[dict[str, Any]] = []
        for group in data.get("groups", []):
            for rule in group.get("rules", []):
                if rule.get("type") == "alerting":
                    rules.append({**rule, "group": group.get("name", "")})
        return rules


class AlertmanagerClient(_Http):
    """Alertmanager's v2 API: alerts and silences."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        super().__init__("Alertmanager", base_url, timeout)

    def _unwrap(self, reply: httpx.Response, body: Any) -> Any:
        if reply.status_code >= 400:
            detail = body if isinstance(body, str) else reply.text
            if isinstance(body, dict):
                detail = body.get("message") or body.get("error") or reply.text
            raise ToolFailure(f"Alertmanager refused it (HTTP {reply.status_code}): {detail}")
        return body

    async def alerts(
        self,
        *,
        active: bool = True,
        silenced: bool = False,
        inhibited: bool = False,
        filter: Iterable[str] = (),
    ) -> list[dict[str, Any]]:
        params = [
            ("active", _flag(active)),
            ("silenced", _flag(silenced)),
            ("inhibited", _flag(inhibited)),
        ] + [("filter", f) for f in filter]
        data: list[dict[str, Any]] = await self._request("GET", "/api/v2/alerts", params)
        return data

    async def silences(self, *, filter: Iterable[str] = ()) -> list[dict[str, Any]]:
        params = [("filter", f) for f in filter]
        data: list[dict[str, Any]] = await self._request("GET", "/api/v2/silences", params)
        return data


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _unix(moment: datetime) -> str:
    return f"{moment.timestamp():.3f}"


def _window(start: datetime | None, end: datetime | None) -> list[tuple[str, str]]:
    params = []
    if start is not None:
        params.append(("start", _unix(start)))
    if end is not None:
        params.append(("end", _unix(end)))
    return params


def matcher(name: str, value: str) -> str:
    """An Alertmanager filter matcher ``name="value"``, quoted."""
    return f"{name}={json.dumps(value)}"


# --- summaries ---------------------------------------------------------------------------


def series_name(labels: Mapping[str, str]) -> str:
    """``metric{a="1",b="2"}`` as Prometheus prints a series."""
    name = labels.get("__name__", "")
    rest = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()) if k != "__name__")
    return f"{name}{{{rest}}}" if rest or not name else name


def _number(raw: str) -> float:
    return float(raw)  # Python reads "NaN", "+Inf", "-Inf" as Prometheus writes them


def chart_value(raw: str) -> Point:
    """A sample value for chart data: a number, None for NaN, "+Inf"/"-Inf" (see module)."""
    value = _number(raw)
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return value


def _sort_key(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 40].rsplit("\n", 1)[0]
    return f"{cut}\n... (cut at {max_chars} characters)"


def summarize_instant(data: Mapping[str, Any], *, limit: int = 20, max_chars: int = 6000) -> str:
    """An instant query's result as a table: largest values first, at most ``limit`` rows."""
    kind = data.get("resultType")
    result: Any = data.get("result") or []
    if kind in ("scalar", "string"):
        _, value = result if isinstance(result, list) else (None, result)
        return f"{kind}: {value}"
    if kind == "matrix":
        return summarize_range(data, limit=limit, max_chars=max_chars)
    samples = [(item["metric"], _number(item["value"][1]), item["value"][1]) for item in result]
    if not samples:
        return "no series matched (empty result)"
    samples.sort(key=lambda s: _sort_key(s[1]), reverse=True)
    lines = [f"{len(samples)} series (value, series; largest first):"]
    for labels, _, raw in samples[:limit]:
        lines.append(f"{_format(raw)}\t{series_name(labels)}")
    if len(samples) > limit:
        lines.append(f"... and {len(samples) - limit} more")
    return _clip("\n".join(lines), max_chars)


def _format(raw: str) -> str:
    value = _number(raw)
    if not math.isfinite(value):
        return raw
    return f"{value:.6g}"


@dataclass(frozen=True, kw_only=True)
class SeriesStats:
    name: str
    minimum: float | None
    average: float | None
    maximum: float | None
    last: str | None
    points: int
    non_finite: int


def series_stats(item: Mapping[str, Any]) -> SeriesStats:
    values = item.get("values", [])
    finite = [v for v in (_number(raw) for _, raw in values) if math.isfinite(v)]
    return SeriesStats(
        name=series_name(item["metric"]),
        minimum=min(finite) if finite else None,
        average=sum(finite) / len(finite) if finite else None,
        maximum=max(finite) if finite else None,
        last=values[-1][1] if values else None,
        points=len(values),
        non_finite=len(values) - len(finite),
    )


def _largest(result: Sequence[Mapping[str, Any]]) -> list[tuple[SeriesStats, Mapping[str, Any]]]:
    ranked = [(series_stats(item), item) for item in result]
    ranked.sort(key=lambda s: -math.inf if s[0].maximum is None else s[0].maximum, reverse=True)
    return ranked


def summarize_range(data: Mapping[str, Any], *, limit: int = 20, max_chars: int = 6000) -> str:
    """A range query's series as min/avg/max/last, largest maximum first."""
    ranked = _largest(data.get("result", []))
    if not ranked:
        return "no series matched in that range (empty result)"

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.6g}"

    lines = [f"{len(ranked)} series over the range (min / avg / max / last; largest max first):"]
    for stats, _ in ranked[:limit]:
        extra = f" ({stats.non_finite} NaN/Inf points)" if stats.non_finite else ""
        last = "-" if stats.last is None else _format(stats.last)
        lines.append(
            f"{show(stats.minimum)} / {show(stats.average)} / {show(stats.maximum)} / {last}"
            f"\t{stats.name}, {stats.points} points{extra}"
        )
    if len(ranked) > limit:
        lines.append(f"... and {len(ranked) - limit} more")
    return _clip("\n".join(lines), max_chars)


def downsample(points: Sequence[Any], limit: int = MAX_CHART_POINTS) -> list[Any]:
    """At most ``limit`` points picked evenly, keeping the first and the last."""
    if len(points) <= limit:
        return list(points)
    if limit == 1:
        return [points[-1]]
    last = len(points) - 1
    return [points[round(i * last / (limit - 1))] for i in range(limit)]


def chart_data(
    query: str,
    data: Mapping[str, Any],
    *,
    start: datetime,
    end: datetime,
    step_seconds: float,
    max_series: int = MAX_CHART_SERIES,
    max_points: int = MAX_CHART_POINTS,
) -> dict[str, Any]:
    """The ``{"kind": "timeseries", ...}`` a client draws: ≤ 20 series (largest), ≤ 300 points."""
    series = []
    for stats, item in _largest(data.get("result", []))[:max_series]:
        points = [[_time(t), chart_value(raw)] for t, raw in item.get("values", [])]
        series.append(
            {
                "name": stats.name,
                "labels": dict(item["metric"]),
                "points": downsample(points, max_points),
            }
        )
    return {
        "kind": "timeseries",
        "query": query,
        "start": _time(start.timestamp()),
        "end": _time(end.timestamp()),
        "step": step_seconds,
        "series": series,
    }


def _time(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
