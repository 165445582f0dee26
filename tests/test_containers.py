"""The container images (deploy/containers) and the stateful parts of the Kubernetes base.

Nothing is built or pulled here: the Containerfiles are read as text (pinned bases, a non-root
user, no secret copied in, an ignore file that keeps secrets out of the build context), and the
manifests of redis/, nats/, clickhouse/ and monitoring/ are checked for what the mesh relies on.
Where the real server binary is installed (the dev stack's redis-server, nats-server, promtool,
amtool), the configuration the pods generate or load is checked by that binary.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]  # no types-PyYAML in the dev extras

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS = ROOT / "deploy" / "containers"
BASE = ROOT / "deploy" / "k8s" / "base"
CONTAINERFILES = sorted(CONTAINERS.glob("*.Containerfile"))
STATEFUL = ("redis", "nats", "clickhouse", "monitoring")
RUN_AS = 10001  # devtools/k8s.py RUN_AS: the manifests' runAsUser for the services image

# A tag with an exact version (major.minor.patch, optional suffix such as -slim-bookworm), or
# a digest. Bare majors (python:3), minors (python:3.11), `latest` and no tag are refused.
EXACT_TAG = re.compile(r"^v?\d+\.\d+\.\d+([.-][A-Za-z0-9.-]+)?$")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
SECRET_PATH = re.compile(
    r"(^|/)(\.run|\.env[^/]*|keys?|secrets?|credentials?)(/|$)|\.(pem|key|p12|pfx)$|id_(rsa|ed25519)",
    re.IGNORECASE,
)


# --- Containerfiles ----------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def image_is_pinned(reference: str) -> bool:
    if DIGEST.search(reference):
        return True
    name = reference.rsplit("/", 1)[-1]
    if ":" not in name:
        return False
    tag = name.split(":", 1)[1]
    return tag != "latest" and EXACT_TAG.match(tag) is not None


def _bases(path: Path) -> list[str]:
    """Every FROM's image (ARG defaults substituted), stages named earlier excluded."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    bases = []
    for keyword, rest in _instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args.setdefault(name.strip(), value.strip().strip('"'))
        elif keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2].lower())
            if image.lower() not in stages:
                bases.append(image)
    return bases


def test_the_images_exist() -> None:
    assert {p.name for p in CONTAINERFILES} == {"services.Containerfile", "web.Containerfile"}


@pytest.mark.parametrize(
    ("reference", "pinned"),
    [
        ("python:3.11.10-slim-bookworm", True),
        ("node:22.12.0-bookworm-slim", True),
        ("nats:2.10.22-alpine", True),
        ("prom/prometheus:v2.55.1", True),
        ("clickhouse/clickhouse-server:25.8.29.51", True),
        ("python@sha256:" + "a" * 64, True),
        ("python:latest", False),
        ("python", False),
        ("python:3", False),
        ("python:3.11", False),
        ("python:3.11-slim-bookworm", False),
        ("registry.example.com:5000/python", False),
    ],
)
def test_the_pin_rule_refuses_floating_tags(reference: str, pinned: bool) -> None:
    assert image_is_pinned(reference) is pinned


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: p.name)
def test_every_base_image_is_pinned(path: Path) -> None:
    bases = _bases(path)
    assert bases
    for base in bases:
        assert image_is_pinned(base), f"{path.name}: FROM {base} is not an exact version/digest"


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: p.name)
def test_the_final_stage_runs_as_a_fixed_non_root_uid(path: Path) -> None:
    instructions = _instructions(path)
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    users = [rest for k, rest in instructions[last_from:] if k == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid == str(RUN_AS), f"{path.name}: USER {users[-1]} (the manifests run as {RUN_AS})"


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: p.name)
def test_nothing_secret_is_copied_in(path: Path) -> None:
    for keyword, rest in _instructions(path):
        if keyword == "ADD":
            pytest.fail(f"{path.name}: ADD {rest} (use COPY; no remote or archive sources)")
        if keyword != "COPY":
            continue
        sources = [w for w in rest.split() if not w.startswith("--")][:-1]
        assert sources
        for source in sources:
            assert source not in (".", "./", "*"), f"{path.name}: COPY {rest} copies everything"
            assert not SECRET_PATH.search(source), f"{path.name}: COPY {source}"
    text = path.read_text()
    for variable in ("PASSWORD", "SECRET", "TOKEN", "API_KEY"):
        assert not re.search(rf"^\s*(ENV|ARG)\s+\S*{variable}", text, re.M | re.I), variable


def test_the_secret_path_rule_catches_secrets() -> None:
    for path in (".run", ".run/keys/k1.pem", ".env", "ui/.env.local", "deploy/tls.key", "keys/"):
        assert SECRET_PATH.search(path), path
    for path in ("mesh/tokens.py", "identity_svc/keys.py", "session_svc/", "gen/python/", "ui/"):
        assert not SECRET_PATH.search(path), path


def test_the_services_image_runs_python_dash_m_and_holds_every_module_the_cluster_runs() -> None:
    instructions = _instructions(CONTAINERS / "services.Containerfile")
    assert ("ENTRYPOINT", '["python", "-m"]') in instructions
    copied = {
        words[0].rstrip("/")
        for k, rest in instructions
        if k == "COPY" and "--from" not in rest
        for words in [rest.split()]
    }
    commands = [
        container["command"]
        for document in _documents(BASE / "mesh")
        if document["kind"] == "Deployment"
        for container in document["spec"]["template"]["spec"]["containers"]
        if container["image"] == "opsmesh/services"
    ]
    assert commands
    for command in commands:
        assert command[:2] == ["python", "-m"], command
        package = command[2].split(".")[0]
        assert package in copied, f"{package} is not copied into the services image"
        assert (ROOT / package / "__main__.py").exists() or (ROOT / package).is_dir()


def _ignore_patterns(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex += "(.*/)?"
                i += 3
            elif glob.startswith("**", i):
                regex += ".*"
                i += 2
            elif glob[i] == "*":
                regex += "[^/]*"
                i += 1
            elif glob[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(glob[i])
                i += 1
        patterns.append((negated, re.compile(regex + "$")))
    return patterns


def ignored(patterns: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, pattern in patterns:
        if any(pattern.match(candidate) for candidate in candidates):
            result = not negated
    return result


IGNORE_FILES = [CONTAINERS / f"{p.name}.dockerignore" for p in CONTAINERFILES]


@pytest.mark.parametrize("path", IGNORE_FILES, ids=lambda p: p.name)
def test_the_ignore_file_keeps_secrets_out_of_the_build_context(path: Path) -> None:
    assert path.exists(), f"{path.name} is missing"
    patterns = _ignore_patterns(path)
    for secret in (
        ".run/keys/2026-01-01.pem",
        ".run/dev-credentials",
        ".run/alert-webhook-token",
        ".env",
        ".env.production",
        "ui/.env.local",
        "mesh/.env",
        "identity_svc/keys/signing.pem",
        "deploy/tls/server.key",
        ".git/config",
        "node_modules/x/index.js",
        "ui/node_modules/x/index.js",
    ):
        assert ignored(patterns, secret), f"{path.name} lets {secret} into the build context"
    for needed in (
        "pyproject.toml",
        "README.md",
        "mesh/server.py",
        "mesh/tokens.py",
        "identity_svc/tokens.py",
        "identity_svc/keys.py",
        "chat_svc/schema/001_chat_history.sql",
        "gen/python/opsmesh/__init__.py",
        "gen/ts/opsmesh/chat/v1/chat_pb.ts",
        "package-lock.json",
        "ui/src/main.tsx",
    ):
        assert not ignored(patterns, needed), f"{path.name} leaves out {needed}"


def test_both_images_share_one_ignore_list() -> None:
    first, second = (p.read_text() for p in IGNORE_FILES)
    assert first == second


def test_the_ignore_rule_can_fail() -> None:
    patterns = _ignore_patterns_from("*\n!mesh/\n")
    assert not ignored(patterns, "mesh/server.py")
    assert ignored(patterns, ".run/keys/k.pem")
    patterns = _ignore_patterns_from("*\n!.run/\n")
    assert not ignored(patterns, ".run/keys/k.pem")


def _ignore_patterns_from(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    scratch = CONTAINERS / ".test-ignore"
    try:
        scratch.write_text(text)
        return _ignore_patterns(scratch)
    finally:
        scratch.unlink()


# --- The stateful parts of the base --------------------------------------------------------


def _documents(directory: Path) -> list[dict[str, Any]]:
    return [
        document
        for path in sorted(directory.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def _stateful() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in STATEFUL:
        for document in _documents(BASE / name):
            yield name, document


def _pods() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, document in _stateful():
        if document["kind"] in ("StatefulSet", "Deployment"):
            yield f"{name}/{document['metadata']['name']}", document["spec"]["template"]["spec"]


def _config(directory: str, config_map: str, key: str) -> str:
    for document in _documents(BASE / directory):
        if document["kind"] == "ConfigMap" and document["metadata"]["name"] == config_map:
            value: str = document["data"][key]
            return value
    raise AssertionError(f"{directory}: no ConfigMap {config_map}")


@pytest.mark.parametrize("name", STATEFUL)
def test_each_part_has_a_kustomization_listing_its_files(name: str) -> None:
    kustomization = yaml.safe_load((BASE / name / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    present = {p.name for p in (BASE / name).glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    for document in _documents(BASE / name):
        kubernetes_validate.validate(document, "1.37.0", strict=True)


def test_secrets_are_referenced_never_committed() -> None:
    for path in (ROOT / "deploy").rglob("*.y*ml"):
        for document in yaml.safe_load_all(path.read_text()):
            assert not (document and document.get("kind") == "Secret"), path
    referenced = set()
    for _, pod in _pods():
        for container in pod.get("initContainers", []) + pod["containers"]:
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add((ref["name"], ref["key"]))
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                for item in volume["secret"]["items"]:
                    referenced.add((volume["secret"]["secretName"], item["key"]))
    assert referenced == {
        ("opsmesh-redis", "password"),
        ("opsmesh-nats", "user"),
        ("opsmesh-nats", "password"),
        ("opsmesh-clickhouse", "user"),
        ("opsmesh-clickhouse", "password"),
        ("opsmesh-alert-webhook", "token"),
    }


def test_every_image_is_pinned_and_every_container_is_hardened() -> None:
    pods = list(_pods())
    assert len(pods) == 5  # redis, nats, clickhouse, prometheus, alertmanager
    for where, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        for container in pod.get("initContainers", []) + pod["containers"]:
            label = f"{where}/{container['name']}"
            assert image_is_pinned(container["image"]), f"{label}: {container['image']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, label
            assert context["allowPrivilegeEscalation"] is False, label
            assert context["capabilities"]["drop"] == ["ALL"], label
            assert {"requests", "limits"} <= container["resources"].keys(), label
        for container in pod["containers"]:
            assert "readinessProbe" in container, where
            assert "livenessProbe" in container, where


def test_the_services_the_mesh_dials_exist_with_their_ports() -> None:
    from devtools.k8s import STATEFUL_SERVICES

    services = {
        d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]}
        for _, d in _stateful()
        if d["kind"] == "Service"
    }
    for name, port in STATEFUL_SERVICES.items():
        if name != "ollama":
            assert port in services[name], f"{name}:{port}"
    assert {6379, 26379} <= services["redis"]
    assert {4222, 6222, 8222} <= services["nats"]
    assert 9000 in services["clickhouse"]
    # The pods carry the labels the mesh's NetworkPolicies (devtools/k8s.py) select.
    labels = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        for _, d in _stateful()
        if d["kind"] == "StatefulSet"
    }
    assert labels == {"redis", "nats", "clickhouse", "prometheus", "alertmanager"}


def test_three_redis_and_three_nats_servers_on_volumes() -> None:
    sets = {d["metadata"]["name"]: d for _, d in _stateful() if d["kind"] == "StatefulSet"}
    for name in ("redis", "nats"):
        assert sets[name]["spec"]["replicas"] == 3
        assert sets[name]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    for name in ("clickhouse", "prometheus"):
        assert sets[name]["spec"]["volumeClaimTemplates"]
    nats = _config("nats", "nats-config", "nats.conf")
    assert "store_dir: /data/jetstream" in nats
    assert nats.count("nats-headless:6222") == 3
    assert "$NATS_USER" in nats
    assert "$NATS_PASSWORD" in nats


def test_alertmanager_sends_to_notify_svc_as_the_dev_stack_does() -> None:
    from devtools.servers import render_alertmanager_config

    shipped = yaml.safe_load(_config("monitoring", "alertmanager-config", "alertmanager.yml"))
    expected = yaml.safe_load(
        render_alertmanager_config(
            webhook_url="http://notify:8093/webhooks/alertmanager",
            token_file=Path("/etc/alertmanager/secrets/token"),
        )
    )
    assert shipped == expected
    # The Service notify_svc runs behind (devtools/k8s.py) serves that port.
    notify = next(
        d
        for d in yaml.safe_load_all((BASE / "mesh" / "notify.yaml").read_text())
        if d and d["kind"] == "Service"
    )
    assert 8093 in {p["port"] for p in notify["spec"]["ports"]}


def test_prometheus_loads_the_rules_configmap_and_discovers_annotated_pods() -> None:
    config = yaml.safe_load(_config("monitoring", "prometheus-config", "prometheus.yml"))
    assert config["rule_files"] == ["/etc/prometheus/rules/opsmesh.rules.yml"]
    (pod_job,) = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" in j]
    assert pod_job["kubernetes_sd_configs"][0]["role"] == "pod"
    keep = pod_job["relabel_configs"][0]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert keep["action"] == "keep"
    prometheus = next(
        d
        for _, d in _stateful()
        if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "prometheus"
    )
    volumes = prometheus["spec"]["template"]["spec"]["volumes"]
    assert {"name": "rules", "configMap": {"name": "opsmesh-prometheus-rules"}} in volumes
    binding = next(d for _, d in _stateful() if d["kind"] == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "prometheus"}]
    assert not [d for _, d in _stateful() if d["kind"].startswith("Cluster")]
    role = next(d for _, d in _stateful() if d["kind"] == "Role")
    assert any("pods" in rule["resources"] and "list" in rule["verbs"] for rule in role["rules"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_prometheus_configuration(tmp_path: Path) -> None:
    from devtools.servers import MESH_RULES

    rules = tmp_path / "opsmesh.rules.yml"
    rules.write_text(MESH_RULES.read_text())
    config = _config("monitoring", "prometheus-config", "prometheus.yml")
    config = config.replace("/etc/prometheus/rules/opsmesh.rules.yml", str(rules))
    probe = tmp_path / "probe.yml"
    probe.write_text(config)
    first = subprocess.run(
        ["promtool", "check", "config", str(probe)], capture_output=True, text=True, check=False
    )
    if "field kubernetes_sd_configs not found" in first.stdout + first.stderr:
        # Debian builds Prometheus without the Kubernetes discovery plugin: check everything
        # else (relabelling, rules, alerting) with a static target in its place.
        document = yaml.safe_load(config)
        for job in document["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["10.0.0.1:9152"]}]
        config = yaml.safe_dump(document)
    (tmp_path / "prometheus.yml").write_text(config)
    result = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool is not installed")
def test_amtool_accepts_the_alertmanager_configuration(tmp_path: Path) -> None:
    (tmp_path / "alertmanager.yml").write_text(
        _config("monitoring", "alertmanager-config", "alertmanager.yml")
    )
    result = subprocess.run(
        ["amtool", "check-config", str(tmp_path / "alertmanager.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed")
def test_nats_server_accepts_its_configuration(tmp_path: Path) -> None:
    (tmp_path / "nats.conf").write_text(_config("nats", "nats-config", "nats.conf"))
    env = {**os.environ, "POD_NAME": "nats-0", "NATS_USER": "mesh", "NATS_PASSWORD": "pw"}
    result = subprocess.run(
        ["nats-server", "--config", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _run_script(
    script: str, env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "script.sh").write_text(script)
    return subprocess.run(
        ["/bin/sh", str(tmp_path / "script.sh")],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": os.environ["PATH"], **env},
        timeout=60,
    )


def test_clickhouse_users_get_the_secrets_name_and_only_a_password_hash(tmp_path: Path) -> None:
    script = _config("clickhouse", "clickhouse-config", "users.sh")
    env = {
        "CLICKHOUSE_USER": "opsmesh",
        "CLICKHOUSE_PASSWORD": "s3cret-Pass",
        "USERS_DIR": str(tmp_path),
    }
    result = _run_script(script, env, tmp_path)
    assert result.returncode == 0, result.stderr
    written = (tmp_path / "opsmesh.xml").read_text()
    assert "s3cret-Pass" not in written
    digest = hashlib.sha256(b"s3cret-Pass").hexdigest()
    assert f"<password_sha256_hex>{digest}</password_sha256_hex>" in written
    assert "<opsmesh>" in written
    assert "</opsmesh>" in written
    refused = _run_script(script, {**env, "CLICKHOUSE_USER": "a<b"}, tmp_path)
    assert refused.returncode != 0
    server = _config("clickhouse", "clickhouse-config", "opsmesh.xml")
    assert "CREATE DATABASE IF NOT EXISTS opsmesh" in server
    assert "CREATE DATABASE IF NOT EXISTS otel" in server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _redis_config(tmp_path: Path, hostname: str) -> tuple[str, str]:
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    # No Sentinel answers (a fresh cluster): redis-cli fails, as it would.
    (stub / "redis-cli").write_text("#!/bin/sh\nexit 1\n")
    (stub / "redis-cli").chmod(0o755)
    (stub / "sleep").write_text("#!/bin/sh\nexit 0\n")
    (stub / "sleep").chmod(0o755)
    out = tmp_path / hostname
    out.mkdir()
    result = subprocess.run(
        ["/bin/sh", "-c", _config("redis", "redis-scripts", "configure.sh")],
        capture_output=True,
        text=True,
        check=False,
        env={
            "PATH": f"{stub}:{os.environ['PATH']}",
            "HOSTNAME": hostname,
            "POD_NAMESPACE": "opsmesh",
            "MASTER_NAME": "opsmesh",
            "REDIS_PASSWORD": "hunter2hunter2",
            "CONFIG_DIR": str(out),
        },
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return (out / "redis.conf").read_text(), (out / "sentinel.conf").read_text()


def test_redis_pods_configure_master_replicas_and_sentinels(tmp_path: Path) -> None:
    master, master_sentinel = _redis_config(tmp_path, "redis-0")
    replica, replica_sentinel = _redis_config(tmp_path, "redis-2")
    assert "replicaof" not in master
    assert "replicaof redis-0.redis.opsmesh.svc 6379" in replica
    for text in (master, replica):
        assert 'requirepass "hunter2hunter2"' in text
        assert 'masterauth "hunter2hunter2"' in text
    assert "replica-announce-ip redis-2.redis.opsmesh.svc" in replica
    for text in (master_sentinel, replica_sentinel):
        assert "sentinel monitor opsmesh redis-0.redis.opsmesh.svc 6379 2" in text
        assert "sentinel auth-pass opsmesh hunter2hunter2" in text
        assert "requirepass" not in text  # redis-py's Sentinel client sends no password


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_server_accepts_the_generated_config_and_requires_the_password(
    tmp_path: Path,
) -> None:
    config, _ = _redis_config(tmp_path, "redis-0")
    data = tmp_path / "data"
    data.mkdir()
    assert "\ndir /data\n" in config
    (tmp_path / "redis.conf").write_text(config.replace("\ndir /data\n", f"\ndir {data}\n"))
    port = _free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            str(tmp_path / "redis.conf"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    anonymous = sock.recv(200)
                    sock.sendall(b"AUTH hunter2hunter2\r\nPING\r\n")
                    time.sleep(0.2)
                    authenticated = sock.recv(200)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read() if server.stdout else ""
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        assert anonymous.startswith(b"-NOAUTH"), anonymous
        assert b"+OK" in authenticated, authenticated
        assert b"+PONG" in authenticated, authenticated
    finally:
        server.terminate()
        server.wait(10)
