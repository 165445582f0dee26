"""The product installs without the repository (issue #16 item 5).

One wheel is built per session from a copy of the sources (so the build writes nothing into the
shared checkout) and installed with ``pip --target`` into a folder outside the checkout. Every
service then runs from that folder: ``python -S -P`` with ``PYTHONPATH`` = the install folder +
the venv's site-packages, so the dependencies come from the venv while neither the checkout's
editable-install finder (a ``.pth`` file, processed only for site directories, which ``-S``
turns off) nor the working directory (``-P``) can lend our packages from the source tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.servers import ManagedProcess, RedisServer, free_port
from mesh.settings import SettingsError, load
from mesh.settingsdoc import help_text, parse_command_line
from ratelimit_svc.server import DEFAULT_RULES, RateLimitSettings
from tests.helpers import PRODUCT_PACKAGES, assert_eventually
from webui.server import WebSettings

CHECKOUT = Path(__file__).resolve().parent.parent
PRODUCT = {*PRODUCT_PACKAGES, "opsmesh"}  # opsmesh: the generated code
ENTRY_MODULES = (
    "identity_svc",
    "session_svc",
    "chat_svc",
    "notify_svc",
    "task_svc",
    "task_svc.worker",
    "ratelimit_svc",
    "edgeinfo_svc",
    "webui",
)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    target: Path
    outside: Path
    """A working directory outside the checkout."""

    def env(self, **settings: str) -> dict[str, str]:
        inherited = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("OPSMESH_", "COVERAGE_", "PYTHON"))
        }
        path = os.pathsep.join((str(self.target), sysconfig.get_paths()["purelib"]))
        return {**inherited, "PYTHONPATH": path, **settings}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-S", "-P", *args]

    def run(self, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            cwd=self.outside,
            env=self.env(**settings),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _copy_sources(destination: Path) -> None:
    """pyproject, README and every top-level package (devtools too: pyproject must leave it out)."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, destination / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    packages = [p for p in CHECKOUT.iterdir() if (p / "__init__.py").is_file()]
    for package in (*packages, CHECKOUT / "gen" / "python"):
        shutil.copytree(package, destination / package.relative_to(CHECKOUT), ignore=ignore)


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    _copy_sources(work / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist")]
    subprocess.run([*build, str(work / "src")], check=True, timeout=300)
    (wheel,) = (work / "dist").glob("opsmesh-*.whl")
    target = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    outside = work / "elsewhere"
    outside.mkdir()
    return Installed(wheel=wheel, target=target, outside=outside)


def test_the_wheel_ships_the_product_and_its_data_but_not_devtools(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    top_level = {name.split("/")[0] for name in names if "/" in name}
    assert {name for name in top_level if not name.endswith(".dist-info")} == PRODUCT
    assert "ratelimit_svc/ratelimits.toml" in names
    # identity's pages, their stylesheet and the common passwords the policy refuses.
    assert {
        "identity_svc/pages/sign_in.html",
        "identity_svc/pages/style.css",
        "identity_svc/data/common_passwords.txt",
    } <= set(names)
    packaged = (installed.target / "ratelimit_svc" / "ratelimits.toml").read_bytes()
    assert packaged == (CHECKOUT / "ratelimit_svc" / "ratelimits.toml").read_bytes()


def test_our_packages_import_from_the_install_not_the_checkout(installed: Installed) -> None:
    script = (
        "import importlib\n"
        f"for name in {(*ENTRY_MODULES, 'mesh')!r}:\n"
        "    print(importlib.import_module(name).__file__)\n"
        "try:\n"
        "    import devtools\n"
        "except ModuleNotFoundError:\n"
        "    print('no devtools')\n"
    )
    result = installed.run("-c", script)
    assert result.returncode == 0, result.stderr
    *files, last = result.stdout.splitlines()
    assert last == "no devtools"
    assert len(files) == len(ENTRY_MODULES) + 1
    for file in files:
        assert Path(file).is_relative_to(installed.target), file


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_every_service_from_the_wheel_prints_its_settings(
    installed: Installed, module: str
) -> None:
    # An unreachable Redis and NATS: --help must not try them.
    result = installed.run(
        "-m", module, "--help", OPSMESH_REDIS_URL="redis://192.0.2.1:1/0", OPSMESH_NATS_URL="x"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module} ")
    assert re.search(r"^  OPSMESH_LOG_LEVEL  default 'INFO'$", result.stdout, re.MULTILINE)


def test_a_service_refuses_arguments_it_does_not_take(installed: Installed) -> None:
    result = installed.run("-m", "chat_svc", "--port", "1")
    assert result.returncode == 2
    assert "unrecognized arguments: --port 1" in result.stderr


@pytest.fixture
def ratelimit_from_wheel(
    installed: Installed, redis_server: RedisServer, tmp_path: Path
) -> Iterator[int]:
    port = free_port()
    process = ManagedProcess(
        "ratelimit_svc (wheel)",
        installed.argv("-m", "ratelimit_svc"),
        log_path=tmp_path / "ratelimit.log",
        ready=re.compile("serving envoy"),
        env=installed.env(
            OPSMESH_GRPC_PORT=str(port),
            OPSMESH_REDIS_URL=redis_server.url,
            OPSMESH_LOG_FORMAT="text",
        ),
    )
    process.start(timeout=60)
    try:
        yield port
    finally:
        process.stop()


async def test_ratelimit_from_the_wheel_serves_the_packaged_rules(
    installed: Installed, ratelimit_from_wheel: int
) -> None:
    rules = tomllib.loads((installed.target / "ratelimit_svc" / "ratelimits.toml").read_text())
    per_user = next(rule for rule in rules["rule"] if rule["keys"] == ["user"])
    request = rls_pb2.RateLimitRequest(
        domain="opsmesh",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="user", value="wheel")]
            )
        ],
    )
    async with aio.insecure_channel(f"127.0.0.1:{ratelimit_from_wheel}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def serving() -> None:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        await assert_eventually(serving)
        verdict = await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(
            request, timeout=5
        )
    assert verdict.statuses[0].current_limit.requests_per_unit == per_user["requests_per_unit"]


async def test_webui_from_the_wheel_serves_the_configured_build(
    installed: Installed, tmp_path: Path
) -> None:
    build = tmp_path / "dist"
    build.mkdir()
    (build / "index.html").write_text("<!doctype html><title>from the wheel</title>")
    port = free_port()
    process = ManagedProcess(
        "webui (wheel)",
        installed.argv("-m", "webui"),
        log_path=tmp_path / "webui.log",
        ready=re.compile("serving the web client"),
        env=installed.env(OPSMESH_WEB_ROOT=str(build), OPSMESH_WEB_PORT=str(port)),
    )
    process.start(timeout=60)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/healthz")).text == "ok"
            assert "from the wheel" in (await client.get("/tasks")).text
    finally:
        process.stop()


def test_webui_from_the_wheel_without_a_root_says_which_setting_is_missing(
    installed: Installed,
) -> None:
    result = installed.run("-m", "webui")
    assert result.returncode == 2
    assert "OPSMESH_WEB_ROOT is required" in result.stderr


def test_the_web_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="OPSMESH_WEB_ROOT is required"):
        load(WebSettings, {})
    missing = tmp_path / "nowhere"
    with pytest.raises(SettingsError, match=f"OPSMESH_WEB_ROOT='{missing}': no such directory"):
        load(WebSettings, {"OPSMESH_WEB_ROOT": str(missing)})


def test_help_lists_the_declared_settings_with_the_services_defaults() -> None:
    lines = help_text(RateLimitSettings).splitlines()
    assert "  OPSMESH_RATELIMIT_FAILURE_MODE  default 'open'" in lines
    assert (
        f"  OPSMESH_RATELIMIT_RULES  default {str(DEFAULT_RULES)!r}  (the packaged file)" in lines
    )
    assert "  OPSMESH_GRPC_PORT  default 50055  (the gRPC port (0: any free port))" in lines
    assert "  OPSMESH_REDIS_URL  default 'redis://127.0.0.1:6379/0'" in lines  # nested
    web = help_text(WebSettings)
    assert "OPSMESH_REDIS_URL" not in web
    assert "  OPSMESH_WEB_ROOT  required  (" in web


def test_help_exits_zero_and_stray_arguments_exit_two(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as helped:
        parse_command_line("ratelimit_svc.server", RateLimitSettings, ["--help"])
    assert helped.value.code == 0
    assert "OPSMESH_RATELIMIT_RULES" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        parse_command_line("ratelimit_svc.server", RateLimitSettings, ["serve"])
    assert refused.value.code == 2
    parse_command_line("ratelimit_svc.server", RateLimitSettings, [])
