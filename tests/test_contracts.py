"""`buf breaking` against the committed baseline (the last release's contracts) can fail.

Each test copies proto/ and buf.yaml to a scratch directory, edits the copy and runs the same
command `make lint` runs, ``buf breaking --against contracts/baseline/opsmesh-contracts.binpb``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "contracts" / "baseline" / "opsmesh-contracts.binpb"
BUF = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf") or "buf"
TASK_PROTO = Path("proto/opsmesh/task/v1/task.proto")


def _scratch(tmp_path: Path) -> Path:
    workspace = tmp_path / "contracts"
    shutil.copytree(ROOT / "proto", workspace / "proto")
    shutil.copy(ROOT / "buf.yaml", workspace / "buf.yaml")
    return workspace


def _edit(workspace: Path, old: str, new: str) -> None:
    path = workspace / TASK_PROTO
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {TASK_PROTO} exactly once"
    path.write_text(text.replace(old, new))


def _breaking(workspace: Path) -> tuple[int, set[str], str]:
    """Exit code, the rule ids that failed, and the output of `buf breaking`."""
    result = subprocess.run(
        [BUF, "breaking", "--against", str(BASELINE), "--error-format", "json"],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    rules = {json.loads(line)["type"] for line in result.stdout.splitlines() if line.strip()}
    return result.returncode, rules, result.stdout + result.stderr


def test_baseline_is_committed() -> None:
    assert BASELINE.is_file()
    assert BASELINE.stat().st_size > 0


def test_unmodified_contracts_pass(tmp_path: Path) -> None:
    code, rules, output = _breaking(_scratch(tmp_path))
    assert code == 0, output
    assert not rules


@pytest.mark.parametrize(
    ("old", "new", "rule"),
    [
        # Task.retry_count moves from 6 to 30: old clients read another field.
        ("int32 retry_count = 6;", "int32 retry_count = 30;", "FIELD_NO_DELETE"),
        # GetTask disappears from TaskService.
        (
            "  // GetTask returns one task.\n"
            "  rpc GetTask(GetTaskRequest) returns (GetTaskResponse);\n",
            "",
            "RPC_NO_DELETE",
        ),
        # WorkspaceQuota.pods becomes a string.
        ("int32 pods = 4;", "string pods = 4;", "FIELD_SAME_TYPE"),
    ],
    ids=["renumber-field", "remove-rpc", "change-field-type"],
)
def test_incompatible_edit_fails(tmp_path: Path, old: str, new: str, rule: str) -> None:
    workspace = _scratch(tmp_path)
    _edit(workspace, old, new)
    code, rules, output = _breaking(workspace)
    assert code != 0, output
    assert rule in rules, output


def test_new_optional_field_passes(tmp_path: Path) -> None:
    workspace = _scratch(tmp_path)
    _edit(
        workspace,
        "  int32 retry_count = 6;\n",
        "  int32 retry_count = 6;\n  // A compatible addition.\n  optional string note = 30;\n",
    )
    code, rules, output = _breaking(workspace)
    assert code == 0, output
    assert not rules


def test_make_lint_checks_against_the_baseline() -> None:
    """`make lint` compares with the committed image, not with a branch that may be itself."""
    planned = subprocess.run(
        ["make", "-n", "lint"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    breaking = [line for line in planned.splitlines() if "buf breaking" in line]
    assert breaking, planned
    assert all(
        f"--against {BASELINE.relative_to(ROOT)}" in line and ".git#" not in line
        for line in breaking
    ), breaking
