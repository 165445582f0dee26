"""The web client in real headless Chromium (Playwright driving Debian's chromium) against the
whole stack as ``make up`` starts it, on free ports: Envoy, every service, Redis, NATS, chDB,
the web client's server, and the Ollama stand-in for the model server.

The scenarios themselves are ui/e2e/*.spec.ts; this test starts what they run against and
fails with their report when any of them fails.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devtools.stack import StackConfig, free_ports_environment, redis_url
from tests.ollama_standin import OllamaStandIn, Reply, Scenario
from tests.webclient import ROOT, ensure_built

CHROMIUM = os.environ.get("OPSMESH_E2E_CHROMIUM", "/usr/bin/chromium")


async def run(*argv: str, env: dict[str, str], limit: float) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        return -1, output.decode(errors="replace") + f"\n(killed after {limit:g}s)"
    return process.returncode or 0, output.decode(errors="replace")


PLAIN = Reply(tokens=[f" t{i}" for i in range(100)])


def model(body: dict[str, Any]) -> Reply:
    """Answers like a tool-calling model: the agents' scenarios call tools, the rest stream text."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        found = [m["content"].splitlines()[0] for m in body["messages"] if m["role"] == "tool"]
        return Reply(tokens=["**From the tools:**\n\n", *(f"- {line}\n" for line in found)])
    question = last["content"].lower()
    if body.get("tools") and "alerts" in question:
        return Reply(
            tool_calls=[
                ("list_alerts", {}),
                ("prometheus_query_range", {"query": "up", "range": "15m", "step": "15s"}),
            ]
        )
    if body.get("tools") and "provision" in question:
        return Reply(tool_calls=[("provision_workspace", {"workspace": "team-x"})])
    return PLAIN


SECOND_ORG = "e2e-second"
"""An organization of its own admin, who invites the dev user (ui/e2e/switcher.spec.ts)."""


async def second_org_admin(env: dict[str, str]) -> dict[str, str]:
    """Creates the admin of SECOND_ORG in the stack's identity store, as ``make up`` creates the
    dev user, and names them for the browser tests."""
    password = secrets.token_urlsafe(16)
    config = StackConfig.from_env(env, ROOT)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "identity_svc.accounts",
        "create",
        "--org",
        SECOND_ORG,
        "--user",
        "second-admin",
        "--roles",
        "admin",
        "--email",
        "second-admin@example.com",
        "--password-stdin",
        cwd=ROOT,
        env=dict(env, OPSMESH_REDIS_URL=redis_url(config)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(f"{password}\n".encode()), 60)
    assert process.returncode == 0, output.decode(errors="replace")
    return {
        "OPSMESH_E2E_SECOND_ORG": SECOND_ORG,
        "OPSMESH_E2E_SECOND_USER": "second-admin",
        "OPSMESH_E2E_SECOND_PASSWORD": password,
    }


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    ensure_built()
    standin = OllamaStandIn()
    # 100 tokens at 40 ms: long enough to press Stop, short enough to wait for a whole answer.
    standin.scenario = Scenario(seconds_per_token=0.04, responder=model)
    await standin.start()
    env = dict(
        os.environ,
        OPSMESH_RUN_DIR=str(tmp_path / "run"),
        OLLAMA_HOST=standin.url,
        OPSMESH_LOG_FORMAT="text",
    )
    env.update(free_ports_environment())
    code, output = await run(sys.executable, "-m", "devtools.stack", "up", env=env, limit=120)
    try:
        assert code == 0, output
        password = (tmp_path / "run" / "dev-credentials").read_text().strip()
        yield dict(
            env,
            **await second_org_admin(env),
            OPSMESH_E2E_URL=f"http://localhost:{env['OPSMESH_DEV_EDGE_PORT']}",
            OPSMESH_E2E_USER="dev",
            OPSMESH_E2E_PASSWORD=password,
            OPSMESH_E2E_CHROMIUM=CHROMIUM,
        )
    finally:
        await run(sys.executable, "-m", "devtools.stack", "down", env=env, limit=60)
        await standin.stop()


async def test_the_web_client_in_a_real_browser(stack: dict[str, str]) -> None:
    npx = shutil.which("npx")
    assert npx, "npx is missing: on Debian, apt-get install npm"
    code, report = await run(npx, "--workspace", "ui", "playwright", "test", env=stack, limit=600)
    print(report)
    assert code == 0, report
    assert " passed" in report
    assert " failed" not in report
    shots = ROOT / "build" / "e2e" / "screenshots"
    assert {
        "01-signed-in.png",
        "02-streaming.png",
        "03-history.png",
        "agents-01-monitoring.png",
        "agents-04-approved.png",
        "members-01-invited.png",
        "switcher-01-second-org.png",
        "reset-01-changed.png",
    } <= {p.name for p in shots.iterdir()}
