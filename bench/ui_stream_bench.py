"""Token-to-screen latency of the web client: when the model server emits a token, how long
until the browser shows it — through the whole product path, and on the floor path, in one run.

Ours: Ollama stand-in → chat_svc → Envoy (JWT, rate limit, grpc-web) → Chromium → React.
Floor: the same stand-in streamed straight into a bare page (fetch + NDJSON reader + one text
node), in the same browser: what any client pays before opsmesh adds anything.
The stand-in records the wall-clock time it wrote each token; the page records when the token
is in the DOM and when the frame showing it is painted (same machine, same clock). Prints
p50/p99 of both, the latency ours adds, and the ratio. Target: <= 30 ms p50 added.

    .venv/bin/python bench/ui_stream_bench.py [--tokens 500] [--seconds-per-token 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from aiohttp import web
from measure import percentile as pct

from devtools.stack import free_ports_environment

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the stand-in and the build helper live in tests/
from tests.ollama_standin import OllamaStandIn, Scenario  # noqa: E402
from tests.webclient import ensure_built  # noqa: E402

CHROMIUM = os.environ.get("OPSMESH_E2E_CHROMIUM", "/usr/bin/chromium")
FLOOR_PAGE = """<!doctype html><meta charset="utf-8"><title>floor</title>
<button id="start">Start</button><p id="answer"></p>
<script>
document.getElementById("start").onclick = async () => {
  const out = document.getElementById("answer").appendChild(document.createTextNode(""));
  const reply = await fetch("/api/chat", {method: "POST", body: JSON.stringify(
    {model: "llama3.2:3b", messages: [{role: "user", content: "floor"}], stream: true})});
  const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffered += value;
    const lines = buffered.split("\\n");
    buffered = lines.pop();
    for (const line of lines) if (line) out.data += JSON.parse(line).message.content;
  }
};
</script>"""


async def run(*argv: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode:
        sys.stderr.write(err.decode(errors="replace"))
    return process.returncode or 0, out.decode(errors="replace")


def latencies(emitted: list[float], shown: list[float]) -> list[float]:
    return [seen - sent * 1000 for sent, seen in zip(emitted, shown, strict=False)]


def row(name: str, values: list[float]) -> str:
    return f"  {name:<34} p50 {pct(values, 0.5):7.1f} ms   p99 {pct(values, 0.99):7.1f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--seconds-per-token", type=float, default=0.02)
    args = parser.parse_args()
    ensure_built()
    scenario = Scenario(
        tokens=[f" w{i}" for i in range(args.tokens)], seconds_per_token=args.seconds_per_token
    )
    ours_model, floor_model = OllamaStandIn(), OllamaStandIn()
    ours_model.scenario = floor_model.scenario = scenario

    async def floor_page(request: web.Request) -> web.Response:
        return web.Response(text=FLOOR_PAGE, content_type="text/html")

    floor_model._runner.app.router.add_get("/", floor_page)
    await ours_model.start()
    await floor_model.start()
    run_dir = Path(tempfile.mkdtemp(prefix="ui-bench-"))
    env = dict(
        os.environ,
        OPSMESH_RUN_DIR=str(run_dir),
        OLLAMA_HOST=ours_model.url,
    )
    env.update(free_ports_environment())
    code, output = await run(sys.executable, "-m", "devtools.stack", "up", env=env)
    if code:
        raise SystemExit(f"the stack did not start:\n{output}")
    try:
        npx = shutil.which("node") or "node"
        code, output = await run(
            npx,
            str(ROOT / "bench" / "ui_stream_probe.mjs"),
            env=dict(
                env,
                OURS_URL=f"http://localhost:{env['OPSMESH_DEV_EDGE_PORT']}/",
                FLOOR_URL=f"{floor_model.url}/",
                USER="dev",
                PASSWORD=(run_dir / "dev-credentials").read_text().strip(),
                CHROMIUM=CHROMIUM,
                TOKENS=str(args.tokens),
                NODE_PATH=str(ROOT / "node_modules"),
            ),
        )
        if code:
            raise SystemExit("the browser probe failed")
    finally:
        await run(sys.executable, "-m", "devtools.stack", "down", env=env)
        await ours_model.stop()
        await floor_model.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    probe = json.loads(output.strip().splitlines()[-1])
    ours_sent = ours_model.requests[-1].emitted
    floor_sent = floor_model.requests[-1].emitted
    results = {
        "ours dom": latencies(ours_sent, probe["ours"]["dom"]),
        "ours painted": latencies(ours_sent, probe["ours"]["paint"]),
        "floor dom": latencies(floor_sent, probe["floor"]["dom"]),
        "floor painted": latencies(floor_sent, probe["floor"]["paint"]),
    }
    print(
        f"token emitted -> shown in Chromium, {args.tokens} tokens at "
        f"{args.seconds_per_token * 1000:g} ms/token"
    )
    print(row("floor (stand-in -> bare page), DOM", results["floor dom"]))
    print(row("floor, painted", results["floor painted"]))
    print(row("opsmesh (chat_svc+Envoy+React), DOM", results["ours dom"]))
    print(row("opsmesh, painted", results["ours painted"]))
    for kind in ("dom", "painted"):
        ours, floor = results[f"ours {kind}"], results[f"floor {kind}"]
        added = pct(ours, 0.5) - pct(floor, 0.5)
        added99 = pct(ours, 0.99) - pct(floor, 0.99)
        ratio = pct(ours, 0.5) / max(pct(floor, 0.5), 0.001)
        verdict = "met" if added <= 30 else "NOT met"
        print(
            f"  added ({kind}): p50 {added:+.1f} ms, p99 {added99:+.1f} ms; "
            f"ratio {ratio:.1f}x the floor (target <= 30 ms p50 added: {verdict})"
        )


if __name__ == "__main__":
    asyncio.run(main())
