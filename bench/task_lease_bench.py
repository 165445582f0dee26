"""What crash safety (leases, outbox markers, the reaper) costs the task path, in one run.

Runs bench/task_bench.py's opsmesh measurement (task_svc + worker processes, real
nats-server, N no-op tasks from 64 publishers) alternately for this tree and for a
baseline checkout (a clone at the commit before leases), several rounds, and prints
the medians and their ratio. Alternating keeps a busy machine's noise on both sides.

    git clone -q . /tmp/opsmesh-base && git -C /tmp/opsmesh-base checkout -q 4408011
    .venv/bin/python bench/task_lease_bench.py --baseline /tmp/opsmesh-base [--tasks 3000]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_RESULT = re.compile(r"^opsmesh .*?\s(\d+)\s+([\d.]+)\s+([\d.]+)\s*$", re.MULTILINE)


def measure(tree: Path, tasks: int) -> tuple[float, float]:
    """tasks/s and publish->start p50 (ms) of one task_bench run against ``tree``'s code."""
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{tree / 'gen' / 'python'}")
    result = subprocess.run(
        [sys.executable, str(tree / "bench" / "task_bench.py"), "--tasks", str(tasks)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    found = _RESULT.search(result.stdout)
    if found is None:
        raise RuntimeError(f"no opsmesh line in the output of {tree}:\n{result.stdout}")
    return float(found.group(1)), float(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout before leases")
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"baseline": [], "leases": []}
    for round_ in range(args.rounds):
        for name, tree in (("baseline", args.baseline.resolve()), ("leases", ROOT)):
            throughput, p50 = measure(tree, args.tasks)
            runs[name].append((throughput, p50))
            print(f"round {round_ + 1} {name:9} {throughput:7.0f} tasks/s  p50 {p50:.1f} ms")
    medians = {
        name: (statistics.median(t for t, _ in done), statistics.median(p for _, p in done))
        for name, done in runs.items()
    }
    base, new = medians["baseline"], medians["leases"]
    print(f"median baseline {base[0]:.0f} tasks/s, p50 {base[1]:.1f} ms")
    print(f"median leases   {new[0]:.0f} tasks/s, p50 {new[1]:.1f} ms")
    print(f"throughput ratio leases/baseline: {new[0] / base[0]:.2f} (target >= 0.90)")


if __name__ == "__main__":
    main()
