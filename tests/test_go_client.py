"""Clients in other languages (issue #14): gen/go builds offline with Debian's Go packages, plain
protoc with the contracts' declared options yields the same Go code, and the Go, Python and
TypeScript examples run against the real stack (``devtools.stack up``), directly and through
Envoy with a token."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from devtools.stack import free_ports_environment
from tests.webclient import ensure_built

ROOT = Path(__file__).resolve().parent.parent
GOCODE = Path("/usr/share/gocode")
SERVICES = ("chat", "identity", "notify", "session", "task")
PROTOS = sorted(str(path.relative_to(ROOT / "proto")) for path in ROOT.glob("proto/**/*.proto"))
DEBIAN_GO = (
    "golang-go protobuf-compiler libprotobuf-dev protoc-gen-go protoc-gen-go-grpc "
    "golang-google-grpc-dev golang-google-genproto-dev golang-google-protobuf-dev "
    "golang-github-golang-protobuf-1-5-dev"
)


def run(
    command: Sequence[str],
    *,
    cwd: Path = ROOT,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    ok: bool = True,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(command),
        cwd=cwd,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if ok:
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return done


def go_toolchain() -> str:
    """`go`, with the Debian library packages gen/go builds against, or a clear failure."""
    tools = ("go", "gofmt", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    for library in (
        "google.golang.org/grpc/go.mod",
        "google.golang.org/genproto/go.mod",
        "google.golang.org/protobuf/go.mod",
        "github.com/golang/protobuf/proto/registry.go",  # 1.5, not Debian's APIv1-only 1.3
    ):
        if not (GOCODE / "src" / library).is_file():
            missing.append(str(GOCODE / "src" / library))
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: on Debian, apt-get install {DEBIAN_GO}")
    return shutil.which("go") or "go"


def gopath(root: Path, trees: Mapping[str, Path]) -> dict[str, str]:
    """A GOPATH at ``root`` holding copies of ``trees`` (import path -> folder) in front of
    Debian's /usr/share/gocode: builds offline, with no module proxy and no module cache."""
    for import_path, folder in trees.items():
        shutil.copytree(folder, root / "src" / import_path)
    return dict(os.environ, GO111MODULE="off", GOPATH=f"{root}:{GOCODE}", GOPROXY="off", GOFLAGS="")


@pytest.fixture(scope="module")
def go_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/go, vetted and built against gen/go (the binary the stack tests run)."""
    go = go_toolchain()
    root = tmp_path_factory.mktemp("gopath")
    env = gopath(
        root,
        {"opsmesh.dev/gen/go": ROOT / "gen/go", "opsmesh.dev/examples/go": ROOT / "examples/go"},
    )
    for package in ("gen/go", "examples/go"):
        source = root / "src" / "opsmesh.dev" / package
        run([go, "vet", "./..."], cwd=source, env=env, timeout=300)
        run([go, "build", "./..."], cwd=source, env=env, timeout=300)
    unformatted = run(["gofmt", "-l", "."], cwd=ROOT / "examples/go").stdout
    assert unformatted == "", f"gofmt -l examples/go: {unformatted}"
    binary = root / "bin" / "opsmesh-example"
    run([go, "build", "-o", str(binary), "."], cwd=root / "src/opsmesh.dev/examples/go", env=env)
    return binary


def test_gen_go_is_one_module_generated_by_the_pinned_plugins() -> None:
    module = (ROOT / "gen/go/go.mod").read_text()
    assert re.search(r"^module opsmesh\.dev/gen/go$", module, re.MULTILINE)
    for proto in PROTOS:
        text = (ROOT / "proto" / proto).read_text()
        declared = re.search(r'option go_package = "opsmesh\.dev/gen/go/([^;"]+);(\w+)"', text)
        assert declared, f"{proto} declares no go_package under opsmesh.dev/gen/go"
        folder, package = ROOT / "gen/go" / declared[1], declared[2]
        stem = Path(proto).stem
        messages = (folder / f"{stem}.pb.go").read_text()
        # protoc-gen-go writes its and protoc's versions: the pins `make gen` checks.
        assert "// \tprotoc-gen-go v1.28.1\n// \tprotoc        v3.21.12\n" in messages
        assert f"\npackage {package}\n" in messages
        # protoc-gen-go-grpc writes a file only for a .proto with services.
        services = folder / f"{stem}_grpc.pb.go"
        assert services.exists() == bool(re.search(r"^service ", text, re.MULTILINE)), proto
        if services.exists():
            assert f"\npackage {package}\n" in services.read_text()


def test_gen_go_and_the_go_example_vet_and_build_offline(go_example: Path) -> None:
    assert go_example.is_file()
    assert "-session-addr" in run([str(go_example), "-help"], ok=False).stderr


def test_plain_protoc_with_the_declared_options_yields_gen_go_and_compiles(
    tmp_path: Path,
) -> None:
    """No M mappings, no module option: go_package alone places and names every package."""
    go = go_toolchain()
    out = tmp_path / "src"
    out.mkdir()
    run(["protoc", "-I", "proto", f"--go_out={out}", f"--go-grpc_out={out}", *PROTOS])
    generated = out / "opsmesh.dev/gen/go"
    names = sorted(str(p.relative_to(generated)) for p in generated.rglob("*.go"))
    assert names == sorted(
        str(p.relative_to(ROOT / "gen/go")) for p in (ROOT / "gen/go").rglob("*.go")
    )
    for service in SERVICES:
        assert f"opsmesh/{service}/v1/{service}_grpc.pb.go" in names
    for name in names:  # byte for byte what `make gen` committed
        assert (generated / name).read_text() == (ROOT / "gen/go" / name).read_text(), name
    env = gopath(tmp_path, {})
    run([go, "build", "opsmesh.dev/gen/go/..."], env=env, timeout=300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The whole dev stack once for this module, on free ports, and a token for the edge."""
    ensure_built()  # the stack serves the web client too
    run_dir = tmp_path_factory.mktemp("stack") / "run"
    env = dict(
        os.environ,
        OPSMESH_RUN_DIR=str(run_dir),
        OLLAMA_HOST="http://127.0.0.1:9",
        OPSMESH_OLLAMA_RETRIES="0",
    )
    env.update(free_ports_environment())
    command = [sys.executable, "-m", "devtools.stack"]
    run([*command, "up"], env=env, timeout=120)
    try:
        edge = f"localhost:{env['OPSMESH_DEV_EDGE_PORT']}"
        issue = ["identity_svc.tokens", "issue", "--user", "dev", "--org", "devorg"]
        token = run(
            [sys.executable, "-m", *issue],
            env=env
            | {
                "OPSMESH_JWT_KEYS_DIR": str(run_dir / "keys"),
                "OPSMESH_JWT_ISSUER": f"http://{edge}",
            },
            timeout=60,
        ).stdout.strip()
        yield {
            "edge": edge,
            "token": token,
            "session": f"localhost:{env['OPSMESH_DEV_SESSION_PORT']}",
            "task": f"localhost:{env['OPSMESH_DEV_TASK_PORT']}",
        }
    finally:
        run([*command, "down"], env=env, timeout=60)


def assert_the_go_walkthrough(output: str) -> None:
    lines = output.splitlines()
    assert "health: SERVING" in lines
    assert re.search(r"^created session [0-9a-f-]{36} version 1$", output, re.MULTILINE)
    assert "got session go example map[env:dev step:1]" in lines
    assert "stale update: Aborted ERROR_REASON_VERSION_MISMATCH" in lines
    assert "retried update: applied on attempt 1" in lines
    statuses = re.findall(r"^task [0-9a-f-]+ (TASK_STATUS_\w+)$", output, re.MULTILINE)
    # The watch starts with the task's current state and ends at its terminal status: the dev
    # stack has no Kubernetes, so the worker fails the workspace task for good.
    assert statuses, output
    assert statuses[-1] == "TASK_STATUS_FAILED", output
    assert "TASK_STATUS_FAILED" not in statuses[:-1], output
    assert "error: InvalidArgument session_id 'not-a-uuid' is not a UUID" in lines
    assert "  ErrorInfo reason INVALID_ARGUMENT domain opsmesh.dev" in lines, output
    assert "  BadRequest field session_id: session_id 'not-a-uuid' is not a UUID" in lines
    assert lines[-1] == "done"


def test_the_go_example_straight_to_the_services(stack: dict[str, str], go_example: Path) -> None:
    done = run(
        # The dev stack's services verify tokens themselves, as in Kubernetes.
        [
            str(go_example),
            *("-session-addr", stack["session"], "-task-addr", stack["task"]),
            *("-token", stack["token"]),
        ],
        timeout=60,
    )
    assert_the_go_walkthrough(done.stdout)


def test_the_go_example_through_envoy_with_a_token(stack: dict[str, str], go_example: Path) -> None:
    health = ["-health-addr", stack["session"]]  # health is not routed through the edge
    done = run(
        [str(go_example), "-addr", stack["edge"], "-token", stack["token"], *health],
        timeout=60,
    )
    assert_the_go_walkthrough(done.stdout)
    refused = run(
        [str(go_example), "-addr", stack["edge"], *health],
        timeout=60,
        ok=False,
    )
    assert refused.returncode != 0
    assert "code = Unauthenticated" in refused.stderr, refused.stderr


def test_the_python_example_straight_to_session_svc(stack: dict[str, str]) -> None:
    done = run(
        [
            sys.executable,
            "examples/python/client.py",
            *("--addr", stack["session"], "--token", stack["token"]),
        ],
        timeout=60,
    )
    lines = done.stdout.splitlines()
    assert lines[0] == "health: SERVING"
    assert re.fullmatch(r"created session [0-9a-f-]{36} version 1", lines[1])
    assert lines[2] == "got session python example"
    assert lines[3] == "error: INVALID_ARGUMENT session_id 'not-a-uuid' is not a UUID"
    assert "  ErrorInfo reason INVALID_ARGUMENT domain opsmesh.dev" in lines
    assert "  BadRequest field session_id: session_id 'not-a-uuid' is not a UUID" in lines


def test_the_typescript_example_through_envoy_with_a_token(
    stack: dict[str, str], tmp_path: Path
) -> None:
    run(["node_modules/.bin/tsc", "-p", "examples/ts", "--outDir", str(tmp_path)], timeout=120)
    (tmp_path / "package.json").write_text('{"type": "module"}\n')  # the output is ES modules
    (tmp_path / "node_modules").symlink_to(ROOT / "node_modules")
    client = tmp_path / "examples/ts/client.js"
    done = run(["node", str(client), f"http://{stack['edge']}", stack["token"]], timeout=60)
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"created session [0-9a-f-]{36} version 1", lines[0])
    assert lines[1] == 'got session ts example {"env":"dev"}'
    assert lines[2] == "error: InvalidArgument session_id 'not-a-uuid' is not a UUID"
    assert "  ErrorInfo reason INVALID_ARGUMENT domain opsmesh.dev" in lines
    assert "  BadRequest field session_id: session_id 'not-a-uuid' is not a UUID" in lines
