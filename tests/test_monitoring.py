"""The monitoring agent's backend and tools against a real Prometheus and Alertmanager."""

from __future__ import annotations

import itertools
import re
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ollama._types
import pytest

from chat_svc.agents.monitoring import default_step, monitoring_tools
from chat_svc.agents.tools import Tool, ToolContext, ToolFailure, ToolOutput
from chat_svc.monitoring import (
    AlertmanagerClient,
    PrometheusClient,
    Scope,
    chart_data,
    chart_value,
    downsample,
    scope_promql,
    summarize_instant,
    summarize_range,
)
from devtools import stack
from devtools.servers import (
    MESH_RULES,
    PrometheusServer,
    ScrapeTarget,
    ServerStartError,
    find_binary,
    free_port,
    render_alertmanager_config,
    render_prometheus_config,
)
from devtools.stack import StackConfig, free_ports_environment
from mesh.context import Principal
from tests.helpers import assert_eventually
from tests.monitoring_fixtures import WEBHOOK_PATH, Monitoring, monitoring

__all__ = ["monitoring"]  # the fixture, registered by importing it

ACME = ToolContext(principal=Principal("alice", "acme"))
GLOBEX = ToolContext(principal=Principal("gus", "globex"))
OPERATOR = ToolContext(principal=Principal("olga", "acme", frozenset({"platform:operator"})))
TOOL_NAMES = {
    "prometheus_query",
    "prometheus_query_range",
    "prometheus_series",
    "prometheus_label_values",
    "list_alerts",
    "list_silences",
    "list_alert_rules",
}


@pytest.fixture
async def clients(monitoring: Monitoring) -> Any:
    prometheus = PrometheusClient(monitoring.prometheus_url, timeout=5)
    alertmanager = AlertmanagerClient(monitoring.alertmanager_url, timeout=5)
    yield prometheus, alertmanager
    await prometheus.aclose()
    await alertmanager.aclose()


@pytest.fixture
def tools(clients: Any) -> dict[str, Tool[Any]]:
    return {t.name: t for t in monitoring_tools(*clients)}


async def call(tools: dict[str, Tool[Any]], name: str, context: ToolContext, **raw: Any) -> Any:
    selected = tools[name]
    return await selected.run(selected.parse(raw), context)


# --- scope_promql --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("up", 'up{org_id="acme"}'),
        ('up{org_id=~".*"}', 'up{org_id="acme"}'),
        ('up{org_id!="acme",job="x"}', 'up{job="x",org_id="acme"}'),
        ('up{org_id="a",org_id="b"}', 'up{org_id="acme"}'),
        ('{__name__=~".+"}', '{__name__=~".+",org_id="acme"}'),
        ("rate(x[5m])", 'rate(x{org_id="acme"}[5m])'),
        ("max_over_time(rate(x[1m])[10m:1m])", 'max_over_time(rate(x{org_id="acme"}[1m])[10m:1m])'),
        ("sum by (org_id) (a) / on () group_left b", None),
        ('label_replace(a, "org_id", "globex", "", "")', None),
        ("absent(nope)", 'absent(nope{org_id="acme"})'),
        ('count_values("v\\"q", a)', 'count_values("v\\"q", a{org_id="acme"})'),
        ('a{job=~"x\\\\.y"}', 'a{job=~"x\\\\.y",org_id="acme"}'),
        ("topk(scalar(count(a)), b)", 'topk(scalar(count(a{org_id="acme"})), b{org_id="acme"})'),
        ("-(a offset 5m)", '-(a{org_id="acme"} offset 5m)'),
    ],
)
def test_every_selector_is_scoped(query: str, expected: str | None) -> None:
    scoped = scope_promql(query, "acme")
    if expected is not None:
        assert scoped == expected
    selectors = scoped.count("{")
    assert scoped.count('org_id="acme"') == selectors
    assert "org_id=~" not in scoped
    assert "org_id!=" not in scoped


def test_an_org_value_is_quoted_not_spliced() -> None:
    scoped = scope_promql("up", 'acme",job=~".*')
    assert scoped == 'up{org_id="acme\\",job=~\\".*"}'


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sum(", "not a valid PromQL query: unclosed left parenthesis"),
        ("rate(x[5m:])", "explicit resolution"),
        ('{a="1" or b="2"}', "'or' inside a selector"),
    ],
)
def test_unscopable_queries_are_tool_failures(query: str, message: str) -> None:
    with pytest.raises(ToolFailure, match=message.replace("(", r"\(").replace(")", r"\)")):
        scope_promql(query, "acme")


def test_platform_roles_are_unscoped_and_others_are_not() -> None:
    assert Scope.of(OPERATOR.principal).org_id is None
    assert Scope.of(Principal("root", "acme", frozenset({"platform:admin"}))).org_id is None
    # An organization's own admins and operators (roles its admins hand out in invitations)
    # never read beyond it.
    org_roles = frozenset({"admin", "operator"})
    assert Scope.of(Principal("ann", "acme", org_roles)).org_id == "acme"
    assert Scope.of(Principal("v", "acme", frozenset({"viewer"}))).org_id == "acme"
    assert Scope(org_id=None).promql("sum(up)") == "sum(up)"
    with pytest.raises(ToolFailure, match="not a series selector"):
        Scope(org_id="acme").selector("sum(up)")


# --- tenancy against the real Prometheus ------------------------------------------------


ATTACKS = [
    'opsmesh_demo_queue_depth{org_id="globex"}',
    'opsmesh_demo_queue_depth{org_id=~".*"}',
    'opsmesh_demo_queue_depth{org_id!="acme"}',
    '{__name__=~".+"}',
    'opsmesh_demo_queue_depth or opsmesh_demo_requests_total{org_id="globex"}',
    'label_replace(opsmesh_demo_queue_depth{org_id="globex"}, "org_id", "acme", "", "")',
    'max_over_time(opsmesh_demo_queue_depth{org_id="globex"}[1m:1s])',
    'opsmesh_demo_queue_depth{org_id="globex"} + on() group_left vector(0)',
    'sort_desc(sum by (org_id, route) (opsmesh_demo_requests_total{org_id=~"glob.*"}))',
    '{org_id="globex"} or {__name__="opsmesh_demo_build_info"}',
]


@pytest.mark.parametrize("attack", ATTACKS)
async def test_other_orgs_series_never_come_back(clients: Any, attack: str) -> None:
    prometheus, _ = clients

    async def unscoped_reaches_globex() -> None:
        # The control: without scoping the attack does reach globex (or org-less) data.
        result = (await prometheus.query(attack))["result"]
        assert any(r["metric"].get("org_id") != "acme" for r in result) or any(
            float(r["value"][1]) == 42 for r in result
        )

    await assert_eventually(unscoped_reaches_globex)
    result = (await prometheus.query(scope_promql(attack, "acme")))["result"]
    for series in result:
        value = float(series["value"][1])
        assert value not in (42, 11), series  # globex's values
        if "org_id" in series["metric"] and "label_replace" not in attack:
            assert series["metric"]["org_id"] == "acme"
        assert series["metric"].get("__name__") != "opsmesh_demo_build_info"


async def test_aggregates_and_absent_only_see_the_callers_org(tools: dict[str, Any]) -> None:
    summed = await call(tools, "prometheus_query", ACME, query="sum(opsmesh_demo_queue_depth)")
    assert "\n7\t" in summed.text
    assert "49" not in summed.text
    everyone = await call(
        tools, "prometheus_query", OPERATOR, query="sum(opsmesh_demo_queue_depth)"
    )
    assert "\n49\t" in everyone.text
    # The platform's series exists, yet for acme it is absent.
    absent = await call(tools, "prometheus_query", ACME, query="absent(opsmesh_demo_build_info)")
    assert "1 series" in absent.text
    present = await call(
        tools, "prometheus_query", OPERATOR, query="absent(opsmesh_demo_build_info)"
    )
    assert "no series matched" in present.text
    # globex cannot probe acme's routes either.
    probe = 'absent(opsmesh_demo_requests_total{route="/b"})'
    assert "1 series" in (await call(tools, "prometheus_query", GLOBEX, query=probe)).text
    assert "no series" in (await call(tools, "prometheus_query", ACME, query=probe)).text


async def test_series_and_label_values_are_scoped(tools: dict[str, Any]) -> None:
    orgs = await call(tools, "prometheus_label_values", ACME, label="org_id")
    assert orgs.text.splitlines()[1:] == ["acme"]
    orgs = await call(tools, "prometheus_label_values", OPERATOR, label="org_id")
    assert orgs.text.splitlines()[1:] == ["acme", "globex"]
    names = await call(tools, "prometheus_label_values", ACME, label="__name__")
    assert "opsmesh_demo_queue_depth" in names.text
    assert "up" not in names.text.split("\n")
    routes = await call(
        tools, "prometheus_label_values", GLOBEX, label="route", match='{org_id=~".+"}'
    )
    assert routes.text.splitlines()[1:] == ["/a"]
    series = await call(tools, "prometheus_series", ACME, match='{__name__=~"opsmesh_demo_.*"}')
    assert "globex" not in series.text
    assert "build_info" not in series.text
    assert "opsmesh_demo_requests_total{instance=" in series.text
    assert series.text.startswith("8 series")  # depth, 2 routes (+ _created), 3 ratios


# --- summaries -----------------------------------------------------------------------------


def vector(values: list[str]) -> dict[str, Any]:
    return {
        "resultType": "vector",
        "result": [
            {"metric": {"__name__": "m", "i": str(i)}, "value": [1700000000, v]}
            for i, v in enumerate(values)
        ],
    }


def test_instant_summary_is_bounded_and_largest_first() -> None:
    text = summarize_instant(vector([str(i) for i in range(30)] + ["NaN", "+Inf"]), limit=5)
    lines = text.splitlines()
    assert lines[0].startswith("32 series")
    assert lines[1] == '+Inf\tm{i="31"}'
    assert lines[2] == '29\tm{i="29"}'
    assert lines[-1] == "... and 27 more"
    assert len(lines) == 7
    long = summarize_instant(vector(["1"] * 500), limit=500, max_chars=1000)
    assert len(long) <= 1000
    assert long.endswith("(cut at 1000 characters)")
    assert summarize_instant({"resultType": "scalar", "result": [1, "3"]}) == "scalar: 3"
    assert "empty result" in summarize_instant({"resultType": "vector", "result": []})


def matrix(series: int, points: int) -> dict[str, Any]:
    return {
        "resultType": "matrix",
        "result": [
            {
                "metric": {"__name__": "m", "s": str(s)},
                "values": [[1000 + t, str(s * 1000 + t)] for t in range(points)],
            }
            for s in range(series)
        ],
    }


def test_range_summary_and_chart_data_are_bounded() -> None:
    data = matrix(25, 1000)
    text = summarize_range(data, limit=20)
    assert text.splitlines()[1].startswith('24000 / 24499.5 / 24999 / 24999\tm{s="24"}')
    assert text.endswith("... and 5 more")
    start = datetime.fromtimestamp(1000, UTC)
    chart = chart_data("m", data, start=start, end=start + timedelta(seconds=999), step_seconds=1)
    assert chart["kind"] == "timeseries"
    assert chart["query"] == "m"
    assert (chart["start"], chart["end"], chart["step"]) == (1000, 1999, 1)
    assert len(chart["series"]) == 20
    first = chart["series"][0]
    assert first["name"] == 'm{s="24"}'
    assert first["labels"] == {"__name__": "m", "s": "24"}
    assert len(first["points"]) == 300
    assert first["points"][0] == [1000, 24000.0]
    assert first["points"][-1] == [1999, 24999.0]
    times = [t for t, _ in first["points"]]
    assert times == sorted(set(times))
    assert max(b - a for a, b in itertools.pairwise(times)) <= 4  # evenly spread


def test_downsample_keeps_short_series_and_ends() -> None:
    assert downsample([1, 2, 3], 300) == [1, 2, 3]
    assert downsample(list(range(10)), 4) == [0, 3, 6, 9]
    assert downsample(list(range(10)), 1) == [9]


def test_default_step_gives_at_most_300_points() -> None:
    for span in (timedelta(minutes=5), timedelta(hours=1), timedelta(days=31)):
        step = default_step(span)
        assert span.total_seconds() / step + 1 <= 300
    assert default_step(timedelta(hours=1)) == 13


async def test_range_tool_charts_nan_and_infinity(tools: dict[str, Any]) -> None:
    async def charted() -> ToolOutput:
        output: ToolOutput = await call(
            tools, "prometheus_query_range", ACME, query="opsmesh_demo_ratio", range="5m"
        )
        assert output.data is not None
        assert len(output.data["series"]) == 3
        assert all(len(s["points"]) >= 2 for s in output.data["series"])
        return output

    output = await assert_eventually(charted, timeout=15)
    assert output.data is not None
    assert output.data["step"] == 2
    assert output.data["query"] == "opsmesh_demo_ratio"
    by_kind = {s["labels"]["kind"]: s for s in output.data["series"]}
    assert {v for _, v in by_kind["nan"]["points"]} == {None}
    assert {v for _, v in by_kind["inf"]["points"]} == {"+Inf"}
    assert {v for _, v in by_kind["one"]["points"]} == {1.0}
    assert all(len(s["points"]) <= 300 for s in output.data["series"])
    assert "NaN/Inf points" in output.text
    assert "(scope: organization acme)" in output.text
    assert len(output.text) <= 6000


async def test_prometheus_errors_are_its_own_message(tools: dict[str, Any]) -> None:
    with pytest.raises(ToolFailure, match=r"Prometheus refused it \(bad_data\): .*11,000 points"):
        await call(tools, "prometheus_query_range", OPERATOR, query="up", range="31d", step="1s")
    with pytest.raises(ToolFailure, match="invalid arguments for prometheus_query_range: range"):
        tools["prometheus_query_range"].parse({"query": "up", "range": "an hour"})
    with pytest.raises(ToolFailure, match="not a valid PromQL query"):
        await call(tools, "prometheus_query", ACME, query="sum(up")


# --- alerts, silences, rules ---------------------------------------------------------------


def alert_names(output: ToolOutput) -> set[str]:
    assert output.data is not None
    return {a["name"] for a in output.data["alerts"]}


async def test_alerts_are_scoped_to_the_callers_org(
    tools: dict[str, Any], monitoring: Monitoring
) -> None:
    acme = await call(tools, "list_alerts", ACME)
    assert alert_names(acme) == set(monitoring.acme_alerts)
    assert acme.text.startswith("1 alerts firing (scope: organization acme):\n- DemoAcmeBacklog")
    muted = await call(tools, "list_alerts", ACME, include_silenced=True)
    assert alert_names(muted) == set(monitoring.acme_alerts + monitoring.acme_silenced)
    assert "suppressed" in muted.text
    globex = await call(tools, "list_alerts", GLOBEX)
    assert alert_names(globex) == set(monitoring.globex_alerts)
    everyone = await call(tools, "list_alerts", OPERATOR)
    assert alert_names(everyone) >= set(
        monitoring.acme_alerts + monitoring.globex_alerts + monitoring.platform_alerts
    )
    assert not alert_names(everyone) & set(monitoring.acme_silenced)
    critical = await call(tools, "list_alerts", OPERATOR, severity="critical")
    assert alert_names(critical) == {"DemoAcmeBacklog", "DemoGlobexBacklog"}
    named = await call(tools, "list_alerts", ACME, alertname="DemoGlobexBacklog")
    assert alert_names(named) == set()
    assert named.text.startswith("0 alerts firing")


async def test_silences_are_scoped(tools: dict[str, Any], monitoring: Monitoring) -> None:
    acme = await call(tools, "list_silences", ACME)
    assert acme.text.startswith("1 silences (scope: organization acme):")
    assert "fixture-acme" in acme.text
    assert "fixture-globex" not in acme.text
    everyone = await call(tools, "list_silences", OPERATOR)
    assert "fixture-acme" in everyone.text
    assert "fixture-globex" in everyone.text


async def test_rules_are_scoped_and_filtered_by_state(tools: dict[str, Any]) -> None:
    acme = await call(tools, "list_alert_rules", ACME)
    assert acme.text.startswith("3 alerting rules (scope: organization acme):")
    assert "DemoGlobex" not in acme.text
    assert "DemoPlatform" not in acme.text
    inactive = await call(tools, "list_alert_rules", ACME, state="inactive")
    assert inactive.text.splitlines()[1].startswith("- DemoAcmeNever [warning] inactive")
    everyone = await call(tools, "list_alert_rules", OPERATOR, state="firing")
    assert everyone.text.startswith("4 firing alerting rules (scope: the whole platform)")


async def test_alertmanager_posts_to_the_webhook_with_the_bearer_token(
    monitoring: Monitoring,
) -> None:
    async def delivered() -> None:
        names = {
            alert["labels"]["alertname"]
            for post in monitoring.webhook_posts
            for alert in post["body"]["alerts"]
        }
        assert "DemoAcmeBacklog" in names
        assert "DemoAcmeMuted" not in names

    await assert_eventually(delivered, timeout=15)
    post = monitoring.webhook_posts[0]
    assert post["path"] == WEBHOOK_PATH
    assert post["authorization"] == f"Bearer {monitoring.webhook_token}"
    assert post["body"]["version"] == "4"


async def test_alertmanager_errors_are_its_own_message(clients: Any) -> None:
    _, alertmanager = clients
    with pytest.raises(ToolFailure, match=r"Alertmanager refused it \(HTTP 400\): .*matcher"):
        await alertmanager.alerts(filter=["{{not a matcher"])


# --- backends down -------------------------------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


async def test_backends_down_are_tool_failures(silent_port: int) -> None:
    closed = free_port()
    prometheus = PrometheusClient(f"http://127.0.0.1:{closed}", timeout=2)
    alertmanager = AlertmanagerClient(f"http://127.0.0.1:{closed}", timeout=2)
    tools = {t.name: t for t in monitoring_tools(prometheus, alertmanager)}
    arguments = {
        "prometheus_query": {"query": "up"},
        "prometheus_query_range": {"query": "up"},
        "prometheus_series": {"match": "up"},
        "prometheus_label_values": {"label": "job"},
        "list_alerts": {},
        "list_silences": {},
        "list_alert_rules": {},
    }
    for name, raw in arguments.items():
        backend = "Alertmanager" if name in ("list_alerts", "list_silences") else "Prometheus"
        with pytest.raises(ToolFailure, match=f"{backend} at http://127.0.0.1:{closed} is unre"):
            await call(tools, name, ACME, **raw)
    await prometheus.aclose()
    await alertmanager.aclose()
    hung = PrometheusClient(f"http://127.0.0.1:{silent_port}", timeout=0.3)
    with pytest.raises(ToolFailure, match="is unreachable: timed out"):
        await hung.query("up")
    await hung.aclose()


# --- tool declarations ---------------------------------------------------------------------


def test_tool_names_schemas_and_backends() -> None:
    prometheus = PrometheusClient("http://127.0.0.1:1")
    alertmanager = AlertmanagerClient("http://127.0.0.1:1")
    every = monitoring_tools(prometheus, alertmanager)
    assert {t.name for t in every} == TOOL_NAMES
    for declared in every:
        assert not declared.changes_state
        checked = ollama._types.Tool.model_validate(declared.schema())
        assert checked.function is not None
        assert checked.function.name == declared.name
        assert checked.function.description
    by_name = {t.name: t.schema()["function"]["parameters"] for t in every}
    assert set(by_name["prometheus_query_range"]["properties"]) == {"query", "range", "step"}
    assert by_name["prometheus_query_range"]["required"] == ["query"]
    assert set(by_name["list_alerts"]["properties"]) == {
        "alertname",
        "severity",
        "include_silenced",
    }
    assert by_name["list_alert_rules"]["properties"]["state"]["enum"] == [
        "firing",
        "pending",
        "inactive",
    ]
    for parameters in by_name.values():
        assert "org_id" not in parameters["properties"]  # scope never comes from the model
    assert {t.name for t in monitoring_tools(prometheus, None)} == {
        "prometheus_query",
        "prometheus_query_range",
        "prometheus_series",
        "prometheus_label_values",
        "list_alert_rules",
    }
    assert {t.name for t in monitoring_tools(None, alertmanager)} == {
        "list_alerts",
        "list_silences",
    }
    assert monitoring_tools(None, None) == []
    with pytest.raises(ToolFailure, match="org_id: Extra inputs are not permitted"):
        every[0].parse({"query": "up", "org_id": "globex"})


# --- configuration files ---------------------------------------------------------------------


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_mesh_rules_pass_promtool() -> None:
    output = run(find_binary("promtool"), "check", "rules", str(MESH_RULES))
    assert "SUCCESS: 8 rules found" in output


def test_rendered_configs_pass_promtool_and_amtool(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        render_prometheus_config(
            targets=[
                ScrapeTarget(job="opsmesh", address="127.0.0.1:9151", labels={"service": "a"}),
                ScrapeTarget(job="opsmesh", address="127.0.0.1:9152", labels={"service": 'b"'}),
            ],
            rule_files=[MESH_RULES],
            alertmanagers=["127.0.0.1:19093"],
        )
    )
    output = run(find_binary("promtool"), "check", "config", str(config))
    assert "SUCCESS: 1 rule files found" in output
    token = tmp_path / "token"
    token.write_text("secret")
    alertmanager = tmp_path / "alertmanager.yml"
    alertmanager.write_text(
        render_alertmanager_config(
            webhook_url="http://127.0.0.1:8093/webhooks/alertmanager", token_file=token
        )
    )
    output = run(find_binary("amtool"), "check-config", str(alertmanager))
    assert "SUCCESS" in output
    assert "1 receivers" in output
    broken = tmp_path / "broken.yml"
    broken.write_text(alertmanager.read_text().replace("type: Bearer", "type: [Bearer"))
    refused = subprocess.run(
        [find_binary("amtool"), "check-config", str(broken)], capture_output=True, timeout=60
    )
    assert refused.returncode != 0


def test_monitoring_nan_is_not_json_number() -> None:
    # The documented choice: NaN → null, ±Inf → Prometheus' strings.
    assert chart_value("NaN") is None
    assert chart_value("+Inf") == "+Inf"
    assert chart_value("-Inf") == "-Inf"
    assert chart_value("1e3") == 1000.0
    assert chart_value("0") == 0.0


# --- the dev stack -----------------------------------------------------------------------------


def test_dev_stack_monitoring_configuration(tmp_path: Path) -> None:
    environment = free_ports_environment()
    assert {"OPSMESH_DEV_PROMETHEUS_PORT", "OPSMESH_DEV_ALERTMANAGER_PORT"} <= set(environment)
    config = StackConfig.from_env({**environment, "OPSMESH_RUN_DIR": str(tmp_path)}, tmp_path)
    assert config.prometheus_port == int(environment["OPSMESH_DEV_PROMETHEUS_PORT"])
    assert StackConfig.from_env({}, tmp_path).prometheus_port == 19090
    assert StackConfig.from_env({}, tmp_path).alertmanager_port == 19093
    rendered = stack.prometheus_config(config)
    for spec in config.services:
        target = f'["127.0.0.1:{spec.metrics_port}"]\n        labels: {{"service": "{spec.name}"}}'
        assert target in rendered
    assert f'targets: ["127.0.0.1:{config.alertmanager_port}"]' in rendered
    prometheus_yml = tmp_path / "prometheus.yml"
    prometheus_yml.write_text(rendered)
    assert "SUCCESS" in run(find_binary("promtool"), "check", "config", str(prometheus_yml))
    env = stack._service_env(config, 1, 2)
    assert env["OPSMESH_PROMETHEUS_URL"] == f"http://127.0.0.1:{config.prometheus_port}"
    assert env["OPSMESH_ALERTMANAGER_URL"] == f"http://127.0.0.1:{config.alertmanager_port}"
    assert env["OPSMESH_TASK_ADDR"] == f"127.0.0.1:{config.port_of('task_svc')}"
    token = env["OPSMESH_ALERT_WEBHOOK_TOKEN"]
    assert len(token) >= 24
    assert config.alert_token_file.read_text() == token
    alertmanager_yml = tmp_path / "alertmanager.yml"
    alertmanager_yml.write_text(stack.alertmanager_config(config))
    assert f"http://127.0.0.1:{config.webhook_port}/webhooks/alertmanager" in (
        alertmanager_yml.read_text()
    )
    assert token not in alertmanager_yml.read_text()
    assert "SUCCESS" in run(find_binary("amtool"), "check-config", str(alertmanager_yml))


def test_missing_binaries_name_their_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(Path, "exists", lambda self: False)
    with pytest.raises(ServerStartError, match=r"apt-get install prometheus\)"):
        find_binary("prometheus")
    with pytest.raises(ServerStartError, match=r"apt-get install prometheus-alertmanager\)"):
        find_binary("prometheus-alertmanager")


_LISTENING_LINE = 'msg="Listening on" address=127.0.0.1:21351'
_READY_LINE = 'msg="Server is ready to receive web requests."'


@pytest.mark.parametrize(
    "log",
    [f"{_LISTENING_LINE}\n{_READY_LINE}", f"{_READY_LINE}\n{_LISTENING_LINE}"],
    ids=["listening-first", "ready-first"],
)
def test_prometheus_readiness_accepts_either_log_order(log: str) -> None:
    # Prometheus logs the two lines from different goroutines; CI once saw them reversed.
    ready = re.compile(PrometheusServer._ready)
    match = ready.search(log)
    assert match is not None
    assert match.group(1) == "21351"
    assert ready.search(_LISTENING_LINE) is None
    assert ready.search(_READY_LINE) is None
