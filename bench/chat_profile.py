"""Where chat_svc's CPU goes: per request and per streamed token, by thread and by part.

The numbers behind chat_bench.py's CPU rows, for the cases where a target is not met.
It starts the same processes as chat_bench.py and loads chat_svc twice: one-token answers
in batches of 20 (the per-request cost), then 50 concurrent 50-token answers (the
per-token cost). For each it prints
* chat_svc's CPU by thread (Linux /proc counters): the event loop, the history writer's
  thread, chDB's own engine threads, gRPC's core threads;
* the event loop thread split by what it was doing, from py-spy samples taken while it
  held the GIL: gRPC and the event loop themselves (C under the loop), Redis, the session
  lookup, the model's HTTP stream, the history, the RPC interceptors, chat_svc's own code.

    PYTHONPATH=. .venv/bin/python bench/chat_profile.py [--seconds 10]

py-spy (the ``bench`` extra) attaches with ptrace: as root, or with CAP_SYS_PTRACE /
``kernel.yama.ptrace_scope=0``; without it only the per-thread split is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# The bench forks py-spy while gRPC's threads run: gRPC's fork handlers only warn about it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import uvloop
from chat_bench import _new_sessions, _processes, through_chat
from grpc import aio
from measure import cpu_seconds

from devtools.servers import RedisServer
from opsmesh.chat.v1 import chat_pb2, chat_pb2_grpc
from opsmesh.session.v1 import session_pb2_grpc

# What a sampled stack was doing: the part of its innermost frame that has a marker.
PARTS = (
    ("Redis", ("redis/", "mesh/redisbatch.py", "mesh/redisconn.py")),
    ("session lookup (gRPC client)", ("grpc/aio/_channel.py", "grpc/aio/_call.py")),
    ("model stream (HTTP, NDJSON)", ("aiohttp/", "chat_svc/model.py", "chat_svc/parts.py")),
    ("history (batching, chDB calls)", ("chat_svc/history.py", "clickhouse_connect/")),
    ("RPC interceptors (mesh/rpc.py, mesh/auth.py)", ("mesh/rpc.py", "mesh/auth.py")),
)


def _threads(pid: int, python_names: dict[str, str]) -> collections.Counter[str]:
    """CPU seconds so far of each of the process' thread groups."""
    used: collections.Counter[str] = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            seconds = cpu_seconds(pid, int(tid))
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        used[_group(tid == str(pid), python_names.get(tid, name))] += seconds
    return used


def _group(main: bool, name: str) -> str:
    if main:
        return "event loop (main thread)"
    if name.startswith("history"):
        return "history writer's thread (chDB inserts)"
    if "_poll_wrapper" in name:
        return "gRPC's poller thread"
    if name == "python":  # a Python thread py-spy could not name
        return "other Python threads"
    if name.startswith(("grpc", "event_engine", "default-executo", "resolver")):
        return "gRPC core threads"
    return "chDB engine threads (merges, pools)"


async def _python_thread_names(pid: int) -> dict[str, str]:
    """OS thread id -> Python thread name, from ``py-spy dump`` (Python names none for the OS)."""
    if (spy := _py_spy()) is None:
        return {}
    dump = await asyncio.create_subprocess_exec(
        spy, "dump", "-p", str(pid), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    out, _ = await dump.communicate()
    found = re.findall(r'^Thread (\d+) \([^)]*\): "([^"]*)"', out.decode(errors="replace"), re.M)
    return dict(found)


def _py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def _part(stack: str) -> str:
    """The part the innermost frame we know belongs to (a Redis call from chat_svc's code is
    Redis; chat_svc's code called by an interceptor is chat_svc's)."""
    frames = stack.split(";")
    under_loop = next(i for i, frame in enumerate(frames) if frame.startswith("Runner.run"))
    if under_loop == len(frames) - 1:
        return "gRPC server + event loop (C under the loop)"
    for frame in reversed(frames[under_loop + 1 :]):
        for name, markers in PARTS:
            if any(marker in frame for marker in markers):
                return name
        if "chat_svc/" in frame:
            return "chat_svc's own code"
    return "other Python (asyncio, protobuf, ...)"


def _parts(raw: Path) -> collections.Counter[str] | None:
    """Samples of the event loop thread by part (py-spy's raw format: stack, space, count)."""
    if not raw.exists():
        return None
    counted: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "Runner.run" in stack:
            counted[_part(stack)] += int(count)
    return counted


async def _profiled(
    pid: int, seconds: float, load: Callable[[], Awaitable[int]], workdir: Path, name: str
) -> tuple[int, collections.Counter[str], collections.Counter[str] | None]:
    """Runs ``load`` (returns units done) repeatedly for ``seconds`` under py-spy."""
    raw = workdir / f"{name}.txt"
    spy = None
    if (spy_path := _py_spy()) is not None:
        spy = await asyncio.create_subprocess_exec(
            *(spy_path, "record", "--gil", "--nonblocking", "-r", "200", "-f", "raw"),
            *("-o", str(raw), "-p", str(pid), "-d", str(int(seconds) + 1)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(0.5)  # attached
    names = await _python_thread_names(pid)
    before, units = _threads(pid, names), 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        units += await load()
    after = _threads(pid, names)
    used = collections.Counter({group: after[group] - before[group] for group in after})
    parts = None
    if spy is not None:
        parts = _parts(raw) if await spy.wait() == 0 else None
    return units, used, parts


def _print(title: str, unit: str, units: int, used: collections.Counter[str], parts: Any) -> None:
    total = sum(used.values())
    print(f"\n{title}: {total / max(1, units) * 1e6:.0f} us CPU per {unit} ({units} {unit}s)")
    for group, seconds in used.most_common():
        if seconds > 0:
            print(f"  {seconds / max(1, units) * 1e6:>8.1f} us  {group}")
    if parts is None:
        print("  (py-spy could not attach: no split of the event loop thread)")
        return
    samples = sum(parts.values())
    loop = used["event loop (main thread)"]
    print(f"  the event loop thread, by part (py-spy, {samples} samples holding the GIL):")
    for part, count in parts.most_common():
        share = count / max(1, samples)
        print(f"  {share * 100:>7.1f}%  {share * loop / max(1, units) * 1e6:>7.1f} us  {part}")


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="chat-profile-"))
    redis = RedisServer(workdir / "redis").start()
    started = _processes(argparse.Namespace(tokens=50, seconds_per_token=0.02), workdir, redis.url)
    pid = started["chat"].pid
    try:
        async with (
            aio.insecure_channel(started["chat_addr"]) as chat_channel,
            aio.insecure_channel(started["session_addr"]) as session_channel,
        ):
            chat = chat_pb2_grpc.ChatServiceStub(chat_channel)
            sessions = session_pb2_grpc.SessionServiceStub(session_channel)
            one_token = chat_pb2.GenerationOptions(max_tokens=1)
            await through_chat(chat, await _new_sessions(sessions, 40), one_token)

            async def requests() -> int:
                ids = await _new_sessions(sessions, 20)
                await through_chat(chat, ids, one_token)
                return len(ids)

            async def tokens() -> int:
                ids = await _new_sessions(sessions, 50)
                return (await through_chat(chat, ids)).tokens

            print(f"chat_svc profile ({args.seconds:g} s per load; chat_bench.py has the ratios)")
            done = await _profiled(pid, args.seconds, requests, workdir, "requests")
            _print("one-token answers, 20 at a time", "request", *done)
            done = await _profiled(pid, args.seconds, tokens, workdir, "tokens")
            _print("50 concurrent 50-token answers", "token", *done)
            print("  (per token includes the requests' own share: one request per 50 tokens)")
    finally:
        for name in ("chat", "session", "standin", "floor"):
            started[name].stop()
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
