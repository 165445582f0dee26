"""What ``make up``'s stack trusts, attacked from a process on the same host, and how an
operator brings one component back (issue #13 item 4 and defence in depth, issue #15 item 5).

One stack for the module, started as ``make up`` starts it (``python -m devtools.stack up``) on
free ports; a stub page stands in for the web client's build, which nothing here loads.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.message
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import nats
import nats.errors
import pytest
import redis
import redis.exceptions
import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.stack import (
    StackConfig,
    _service_env,
    edge_config,
    free_ports_environment,
    restart,
)
from mesh.settings import SettingsError
from opsmesh.chat.v1 import chat_pb2, chat_pb2_grpc
from opsmesh.identity.v1 import organization_pb2, organization_pb2_grpc
from opsmesh.notify.v1 import notify_pb2, notify_pb2_grpc
from opsmesh.session.v1 import session_pb2, session_pb2_grpc
from opsmesh.task.v1 import task_pb2, task_pb2_grpc
from ratelimit_svc.edgeauth import (
    EDGE_CREDENTIAL_METADATA,
    EDGE_CREDENTIAL_VARIABLE,
)
from ratelimit_svc.server import RateLimitSettings
from tests.helpers import assert_eventually, identity

ROOT = Path(__file__).resolve().parent.parent


class Stack:
    def __init__(self, env: dict[str, str], run_dir: Path, up_output: str) -> None:
        self.env = env
        self.run_dir = run_dir
        self.up_output = up_output

    def port(self, name: str) -> int:
        return int(self.env[f"OPSMESH_DEV_{name}_PORT"])

    @property
    def edge(self) -> str:
        return f"http://localhost:{self.port('EDGE')}"

    def secret(self, name: str) -> str:
        return (self.run_dir / name).read_text().strip()

    def command(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "devtools.stack", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def components(self) -> dict[str, dict[str, Any]]:
        state = json.loads((self.run_dir / "stack.json").read_text())
        return {entry["name"]: entry for entry in state}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("trust")
    web = base / "web"
    web.mkdir()
    (web / "index.html").write_text("<!doctype html><title>stub</title>")
    run_dir = base / "run"
    env = dict(
        os.environ,
        OPSMESH_RUN_DIR=str(run_dir),
        OPSMESH_WEB_ROOT=str(web),
        OLLAMA_HOST="http://127.0.0.1:9",  # nothing answers: no model server needed here
        OPSMESH_OLLAMA_RETRIES="0",
    )
    env.update(free_ports_environment())
    started = Stack(env, run_dir, "")
    up = started.command("up", timeout=180)
    assert up.returncode == 0, up.stderr + up.stdout
    started.up_output = up.stdout
    try:
        yield started
    finally:
        started.command("down")


# --- signing out through the edge -------------------------------------------------------------


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign_in(stack: Stack, user: str = "dev", password: str = "") -> dict[str, Any]:
    """The web client's sign-in, through the edge: authorization code with PKCE (the dev
    user unless another is named)."""
    verifier, challenge = _pkce()
    redirect = f"{stack.edge}/oauth/callback"
    params = {
        "response_type": "code",
        "client_id": "opsmesh-web",
        "redirect_uri": redirect,
        "state": "s",
        "scope": "openid offline_access",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    with httpx.Client(base_url=stack.edge, timeout=10) as http:
        page = http.get("/oauth/authorize", params=params)
        form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
        login = {"username": user, "password": password or stack.secret("dev-credentials")}
        signed = http.post("/oauth/authorize", data=form | login)
        assert signed.status_code == 302, signed.text
        code = parse_qs(urlsplit(signed.headers["location"]).query)["code"][0]
        tokens = http.post(
            "/oauth/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "client_id": "opsmesh-web",
                "redirect_uri": redirect,
                "code_verifier": verifier,
            },
        )
    assert tokens.status_code == 200, tokens.text
    body: dict[str, Any] = tokens.json()
    return body


Metadata = tuple[tuple[str, str], ...]


async def _answer(call: Any, request: Any, metadata: Metadata) -> grpc.StatusCode:
    try:
        response = call(request, metadata=metadata, timeout=10)
        if hasattr(response, "__aiter__"):
            async for _ in response:
                break
        else:
            await response
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _every_service(address: str, metadata: Metadata) -> dict[str, str]:
    """Each public service's answer to one cheap call, by status code name."""
    async with grpc.aio.insecure_channel(address) as channel:
        calls = {
            "session": (
                session_pb2_grpc.SessionServiceStub(channel).ListSessions,
                session_pb2.ListSessionsRequest(),
            ),
            "chat": (
                chat_pb2_grpc.ChatServiceStub(channel).ListApprovals,
                chat_pb2.ListApprovalsRequest(),
            ),
            "notify": (
                notify_pb2_grpc.NotificationServiceStub(channel).ListTemplates,
                notify_pb2.ListTemplatesRequest(),
            ),
            "task": (task_pb2_grpc.TaskServiceStub(channel).ListTasks, task_pb2.ListTasksRequest()),
        }
        return {
            name: (await _answer(call, request, metadata)).name
            for name, (call, request) in calls.items()
        }


async def test_a_signed_out_session_is_refused_at_once_on_every_service_through_the_edge(
    stack: Stack,
) -> None:
    tokens = sign_in(stack)
    bearer = (("authorization", f"Bearer {tokens['access_token']}"),)
    edge = f"localhost:{stack.port('EDGE')}"
    signed_in = await _every_service(edge, bearer)
    assert "UNAUTHENTICATED" not in signed_in.values(), signed_in

    async with httpx.AsyncClient(base_url=stack.edge, timeout=10) as http:
        revoked = await http.post("/oauth/revoke", data={"token": tokens["refresh_token"]})
    assert revoked.status_code == 200, revoked.text

    # The access token is still valid for Envoy (signature, expiry); every service says no.
    signed_out = await _every_service(edge, bearer)
    assert signed_out == dict.fromkeys(signed_in, "UNAUTHENTICATED")


async def test_a_host_process_claiming_an_identity_on_a_service_port_is_refused(
    stack: Stack,
) -> None:
    spoofed = identity(user="dev", org="dev", roles="admin")
    for name in ("SESSION", "CHAT", "NOTIFY", "TASK"):
        answers = await _every_service(f"127.0.0.1:{stack.port(name)}", spoofed)
        service = name.lower()
        assert answers[service] == "UNAUTHENTICATED", (name, answers)


# --- ratelimit_svc answers only the edge ---------------------------------------------------------


def _rate_limit_request() -> rls_pb2.RateLimitRequest:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="remote_address", value="203.0.113.9")
    return rls_pb2.RateLimitRequest(
        domain="opsmesh", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])]
    )


async def test_ratelimit_svc_answers_only_the_edges_credential(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.port('RATELIMIT')}") as channel:
        limits = rls_pb2_grpc.RateLimitServiceStub(channel)
        for shown in ((), ((EDGE_CREDENTIAL_METADATA, "x" * 32),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await limits.ShouldRateLimit(_rate_limit_request(), metadata=shown, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        credential = ((EDGE_CREDENTIAL_METADATA, stack.secret("ratelimit-edge-credential")),)
        answer = await limits.ShouldRateLimit(_rate_limit_request(), metadata=credential)
        assert answer.overall_code == rls_pb2.RateLimitResponse.OK
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes stay public


async def test_the_edge_shows_its_credential_to_ratelimit_svc(stack: Stack) -> None:
    admin = f"http://127.0.0.1:{stack.port('EDGE_ADMIN')}/stats"
    async with httpx.AsyncClient(timeout=5) as http:
        for _ in range(3):
            await http.get(f"{stack.edge}/")  # the web client's route asks for a decision

        async def decided() -> None:
            stats = (await http.get(admin, params={"filter": r"^cluster\.web\.ratelimit"})).text
            counters = dict(line.split(": ") for line in stats.splitlines())
            assert int(counters.get("cluster.web.ratelimit.ok", "0")) >= 1, stats
            assert int(counters.get("cluster.web.ratelimit.error", "0")) == 0, stats

        await assert_eventually(decided)


# --- the stores require their credentials -------------------------------------------------------


async def test_an_alert_through_the_webhook_becomes_an_email_in_jwt_mode(stack: Stack) -> None:
    # The webhook brings no user token: notify_svc queues the delivery with its own client.
    alert = {
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "StackTrustProbe", "severity": "warning"},
                "annotations": {"summary": "probe from the trust tests"},
                "fingerprint": secrets.token_hex(8),
                "startsAt": "2026-11-29T00:00:00Z",
            }
        ]
    }
    token = stack.secret("alert-webhook-token")
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"http://127.0.0.1:{stack.port('WEBHOOK')}/webhooks/alertmanager",
            json=alert,
            headers={"Authorization": f"Bearer {token}"},
        )
    assert reply.status_code == 202, reply.text

    async def delivered() -> None:
        files = [path for path in (stack.run_dir / "mail").rglob("*") if path.is_file()]
        mails = [path.read_text(errors="replace") for path in files]
        assert any("StackTrustProbe" in mail for mail in mails)

    await assert_eventually(delivered, timeout=30)


def _mail_to(stack: Stack, address: str) -> list[email.message.Message]:
    files = [path for path in (stack.run_dir / "mail").rglob("*") if path.is_file()]
    mails = [email.message_from_bytes(path.read_bytes()) for path in files]
    return [mail for mail in mails if address in str(mail.get("To", ""))]


def _text_of(mail: email.message.Message) -> str:
    parts = [part for part in mail.walk() if part.get_content_type() == "text/plain"]
    payload = parts[0].get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


async def test_an_invitation_email_reaches_the_mail_sink_and_its_link_signs_the_person_up(
    stack: Stack,
) -> None:
    # Issue #17's path as a person sees it: the dev admin invites, notify_svc (as identity's
    # service credentials allow) delivers through the task worker to the mail sink, and the
    # link in that email makes an account that signs in as a member of the dev org.
    invited = f"guest{secrets.token_hex(4)}@example.com"
    admin = sign_in(stack)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.port('EDGE')}") as channel:
        orgs = organization_pb2_grpc.OrganizationServiceStub(channel)
        await orgs.InviteMember(
            organization_pb2.InviteMemberRequest(email=invited, role="operator"),
            metadata=(("authorization", f"Bearer {admin['access_token']}"),),
            timeout=10,
        )

        async def delivered() -> str:
            mails = _mail_to(stack, invited)
            assert mails
            found = re.search(r"https?://\S+/invitations/accept\?token=[\w-]+", _text_of(mails[0]))
            assert found
            return found.group(0)

        link = await assert_eventually(delivered, timeout=30)
        assert link.startswith(f"{stack.edge}/invitations/accept?token=")
        name = f"guest{secrets.token_hex(3)}"
        password = "an invitation well taken"
        async with httpx.AsyncClient(timeout=10) as http:
            page = await http.get(link)
            assert page.status_code == 200, page.text
            form = dict(
                re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text)
            )
            joined = await http.post(
                f"{stack.edge}/invitations/accept",
                data={**form, "username": name, "password": password, "confirm": password},
                headers={"Origin": "null"},
            )
            assert joined.status_code == 200, joined.text
        tokens = sign_in(stack, name, password)
        mine = await orgs.ListMyOrganizations(
            organization_pb2.ListMyOrganizationsRequest(),
            metadata=(("authorization", f"Bearer {tokens['access_token']}"),),
            timeout=10,
        )
    assert [(o.org_id, list(o.roles)) for o in mine.organizations] == [("dev", ["operator"])]


def test_redis_refuses_a_client_without_the_password(stack: Stack) -> None:
    anonymous = redis.Redis(port=stack.port("REDIS"), socket_timeout=5)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=stack.port("REDIS"), password="guess" * 4).ping()
    admitted = redis.Redis(port=stack.port("REDIS"), password=stack.secret("redis-password"))
    assert admitted.ping()


async def test_nats_refuses_a_client_without_the_password(stack: Stack) -> None:
    url = f"nats://127.0.0.1:{stack.port('NATS')}"
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, connect_timeout=5, error_cb=_quiet)
    password = stack.secret("nats-password")
    client = await nats.connect(f"nats://opsmesh:{password}@127.0.0.1:{stack.port('NATS')}")
    assert client.is_connected
    await client.close()


async def _quiet(error: Exception) -> None:
    del error  # the refusal is what the test expects


def _listening_addresses() -> dict[int, set[str]]:
    """TCP ports in LISTEN state on this host and the addresses they are bound to."""
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            address, port = local.split(":")
            found.setdefault(int(port, 16), set()).add(address)
    return found


# 127.0.0.1, ::ffff:127.0.0.1 (gRPC's dual-stack socket) and ::1 as /proc/net/tcp* write them.
LOOPBACK = {
    "0100007F",
    "0000000000000000FFFF00000100007F",
    "00000000000000000000000001000000",
}


def test_every_listener_of_the_stack_is_on_loopback(stack: Stack) -> None:
    listening = _listening_addresses()
    ports = {name: int(port) for name, port in stack.env.items() if name.startswith("OPSMESH_DEV_")}
    opened = {name: port for name, port in ports.items() if port in listening}
    assert "OPSMESH_DEV_EDGE_PORT" in opened
    assert "OPSMESH_DEV_SESSION_PORT" in opened
    wide = {name: listening[port] - LOOPBACK for name, port in opened.items()}
    assert not any(wide.values()), wide


# --- the operator's commands --------------------------------------------------------------------


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_up_brings_back_a_dead_component_and_says_so(stack: Stack) -> None:
    before = stack.components()["chat_svc"]
    os.kill(before["pid"], signal.SIGKILL)
    status = stack.command("status")
    assert status.returncode == 1
    assert re.search(rf"chat_svc .* pid {before['pid']} +DEAD", status.stdout), status.stdout

    up = stack.command("up")
    assert up.returncode == 0, up.stderr + up.stdout
    assert "chat_svc was not running" in up.stdout
    after = stack.components()["chat_svc"]
    assert after["pid"] != before["pid"]
    status = stack.command("status")
    assert status.returncode == 0, status.stdout
    assert re.search(rf"chat_svc .* pid {after['pid']} +SERVING", status.stdout), status.stdout


def test_restart_starts_one_component_again_with_the_same_command_and_environment(
    stack: Stack,
) -> None:
    before = stack.components()["notify_svc"]
    environment = _environ(before["pid"])
    restarted = stack.command("restart", "notify_svc")
    assert restarted.returncode == 0, restarted.stderr + restarted.stdout
    after = stack.components()["notify_svc"]
    assert f"restarted notify_svc (pid {after['pid']}" in restarted.stdout
    assert after["pid"] != before["pid"]
    assert _environ(after["pid"]) == environment
    assert Path(f"/proc/{after['pid']}/cmdline").read_bytes().split(b"\0")[:-1] == [
        part.encode() for part in before["argv"]
    ]
    status = stack.command("status")
    assert re.search(rf"notify_svc .* pid {after['pid']} +SERVING", status.stdout), status.stdout
    assert "already up" in stack.command("up").stdout


def test_restart_names_what_it_cannot_restart(stack: Stack) -> None:
    unknown = stack.command("restart", "nope_svc")
    assert unknown.returncode == 2
    assert "no component 'nope_svc'" in unknown.stderr
    assert "chat_svc" in unknown.stderr
    assert stack.command("restart").returncode == 2  # the name is required


def test_the_printed_token_command_works_as_pasted_without_the_venv(stack: Stack) -> None:
    line = next(
        line for line in stack.up_output.splitlines() if "identity_svc.tokens issue" in line
    )
    command = line.split(": ", 1)[1]
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(stack.run_dir)}  # no venv, no OPSMESH_*
    issued = subprocess.run(
        ["/bin/sh", "-c", command],
        env=bare,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    answers = asyncio.run(
        _every_service(f"localhost:{stack.port('EDGE')}", (("authorization", f"Bearer {token}"),))
    )
    assert answers["session"] == "OK", answers


# --- configuration, without a running stack -----------------------------------------------------


def test_cors_oauth_and_ui_dev_follow_moved_edge_and_vite_ports(tmp_path: Path) -> None:
    moved = {"OPSMESH_DEV_EDGE_PORT": "18080", "OPSMESH_DEV_UI_PORT": "15173"}
    config = StackConfig.from_env({**moved, "OPSMESH_RUN_DIR": str(tmp_path)}, tmp_path)
    edge = yaml.safe_load(edge_config(config))
    (listener,) = edge["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = manager["route_config"]["virtual_hosts"]
    cors = host["typed_per_filter_config"]["envoy.filters.http.cors"]
    origins = {entry["exact"] for entry in cors["allow_origin_string_match"]}
    assert origins == {"http://localhost:18080", "http://localhost:15173"}
    assert listener["address"]["socket_address"]["address"] == "127.0.0.1"
    clients = _service_env(config, 1, 2)["OPSMESH_OAUTH_CLIENTS"]
    assert "http://localhost:15173/oauth/callback" in clients
    ui_dev = subprocess.run(
        ["make", "-n", "ui-dev"],
        env=dict(os.environ, **moved),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "VITE_OPSMESH_API_URL=http://localhost:18080" in ui_dev
    assert "OPSMESH_DEV_UI_PORT=15173" in ui_dev


def test_the_bind_address_is_an_ip_address(tmp_path: Path) -> None:
    wide = StackConfig.from_env({"OPSMESH_BIND_ADDRESS": "0.0.0.0"}, tmp_path)
    assert wide.bind_address == "0.0.0.0"
    (listener,) = yaml.safe_load(edge_config(wide))["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    with pytest.raises(SystemExit, match="OPSMESH_BIND_ADDRESS='everywhere'"):
        StackConfig.from_env({"OPSMESH_BIND_ADDRESS": "everywhere"}, tmp_path)


def test_a_record_without_commands_cannot_be_restarted_piece_by_piece(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = StackConfig.from_env({"OPSMESH_RUN_DIR": str(tmp_path)}, tmp_path)
    older = [{"name": "chat_svc", "pid": 2**22 + 1, "address": "-", "log": "-", "grpc_port": 1}]
    config.state_file.write_text(json.dumps(older))
    assert restart(config, "chat_svc") == 1
    assert "make down && make up" in capsys.readouterr().err


def test_the_edge_credential_setting_takes_url_safe_secrets_only() -> None:
    for bad in ("short", "has spaces in it, sixteen+", 'quote"d-0123456789abcdef'):
        with pytest.raises(SettingsError, match=EDGE_CREDENTIAL_VARIABLE):
            RateLimitSettings.from_env({EDGE_CREDENTIAL_VARIABLE: bad})
    good = RateLimitSettings.from_env({EDGE_CREDENTIAL_VARIABLE: "0123456789abcdef_-"})
    assert good.edge_credential == "0123456789abcdef_-"


def test_system_packages_lists_one_set_for_up_and_test() -> None:
    script = ROOT / "devtools" / "system-packages"
    usage = subprocess.run([script, "everything"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2
    assert "usage" in usage.stderr
    ci = (ROOT / ".ci" / "run").read_text()
    assert "devtools/system-packages test" in ci
    assert "apt-get" not in ci  # the list and the install live in one place
    makefile = (ROOT / "Makefile").read_text()
    assert "devtools/system-packages test" in makefile
    assert "devtools/system-packages up" in makefile


def test_restart_finds_a_component_by_its_short_name() -> None:
    from devtools.stack import Component, _named

    components = [
        Component(name=name, pid=1, address="", log="")
        for name in ("nats", "task_svc", "task_worker", "chat_svc")
    ]
    assert _named(components, "worker").name == "task_worker"  # type: ignore[union-attr]
    assert _named(components, "task").name == "task_svc"  # type: ignore[union-attr]
    assert _named(components, "chat_svc").name == "chat_svc"  # type: ignore[union-attr]
    assert _named(components, "nope") is None
