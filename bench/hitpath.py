"""Hit-path throughput: cacheproxy L1 hit and L2 hit against a bare aiohttp ceiling.

Each target serves the same ~2 KB JSON body. wrk (1 thread, 64 connections) runs on one
core and the server under test on the other (taskset); redis-server shares wrk's core.
Targets are interleaved within each repetition and the ratios (L1 / bare, L2 / L1) are
computed inside a repetition, then the median is reported: these machines are shared and
noisy, so a lone absolute number means little.

    python bench/hitpath.py [--reps 5] [--seconds 5]

Writes bench/results/hitpath.json and bench/results/hitpath.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PATH = "/quote/AAPL"

BARE = """
import sys
from aiohttp import web
BODY = b'{"x": "' + b"a" * 2000 + b'"}'
STORE = {"/quote/AAPL": BODY}
HEADERS = {"Content-Type": "application/json", "Cache-Control": "public, max-age=1"}
async def handle(request):
    return web.Response(body=STORE[request.path], headers=HEADERS)
app = web.Application()
app.router.add_get("/{tail:.*}", handle)
try:
    import uvloop
    loop = uvloop.new_event_loop()
except ImportError:
    loop = None
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, loop=loop)
"""

CONFIG = """
server: {{host: 127.0.0.1, port: {port}, admin_port: {admin}}}
upstreams: {{api: {{url: "http://127.0.0.1:{upstream}"}}}}
ttl_classes: {{long: 1h}}
routes:
  - {{name: quote, path: "/quote/{{symbol}}", upstream: api, ttl_class: long}}
cache: {{backend: {backend}, redis: {{url: "redis://127.0.0.1:{redis}/0"}}}}  # default timeouts
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if shutil.which("taskset") else argv


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_wrk(output: str) -> dict[str, float]:
    def latency(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if not m:
            return float("nan")
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
        return float(m.group(1)) * scale

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    requests = re.search(r"(\d+) requests in", output)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": float(requests.group(1)) if requests else 0.0,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    for tool in ("wrk", "redis-server"):
        if not shutil.which(tool):
            print(f"bench needs {tool} (apt-get install -y {tool})", file=sys.stderr)
            return 2
    python = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="cacheproxy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    ports = {name: free_port() for name in ("bare", "upstream", "l1", "l2", "redis")}
    admin = {name: free_port() for name in ("l1", "l2")}

    def spawn(argv: list[str], core: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(pinned(core, argv), cwd=ROOT, stdout=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    try:
        (tmp / "bare.py").write_text(BARE)
        spawn(
            ["redis-server", "--port", str(ports["redis"]), "--save", "", "--appendonly", "no"], 0
        )
        servers = {"bare": spawn([python, str(tmp / "bare.py"), str(ports["bare"])], 1)}
        spawn([python, str(tmp / "bare.py"), str(ports["upstream"])], 0)
        for name, backend in (("l1", "memory"), ("l2", "redis")):
            path = tmp / f"{name}.yaml"
            path.write_text(CONFIG.format(
                port=ports[name], admin=admin[name], upstream=ports["upstream"],
                backend=backend, redis=ports["redis"],
            ))  # fmt: skip
            servers[name] = spawn(
                [python, "-m", "proxy", "serve", "-c", str(path), "--log-level", "warning"], 1
            )
        for port in ports.values():
            wait_port(port)
        for name in ("bare", "l1", "l2"):  # fill the caches, and check each serves the body
            out = subprocess.run(
                ["curl", "-s", "-D", "-", f"http://127.0.0.1:{ports[name]}{PATH}"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            assert '"x": "aaaa' in out, (name, out[:300])
        time.sleep(0.5)  # let the L2 write land before measuring L2 hits
        rows: list[dict[str, dict[str, float]]] = []
        order = ["bare", "l1", "l2"]
        for rep in range(args.reps):
            random.shuffle(order)
            row: dict[str, dict[str, float]] = {}
            for name in order:
                cpu_before = cpu_seconds(servers[name].pid)
                out = subprocess.run(
                    pinned(0, ["wrk", "-t1", "-c64", f"-d{args.seconds}s", "--latency",
                               f"http://127.0.0.1:{ports[name]}{PATH}"]),
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                stats = parse_wrk(out)
                cpu = cpu_seconds(servers[name].pid) - cpu_before
                stats["cpu_us_per_request"] = cpu / max(1.0, stats["requests"]) * 1e6
                row[name] = stats
            row["ratio"] = {
                "l1_over_bare": row["l1"]["rps"] / row["bare"]["rps"],
                "l2_over_l1": row["l2"]["rps"] / row["l1"]["rps"],
            }
            rows.append(row)
            print(f"rep {rep + 1}: " + "  ".join(f"{n} {row[n]['rps']:.0f} req/s" for n in
                  ("bare", "l1", "l2")) + f"  L1/bare {row['ratio']['l1_over_bare']:.2f}"
                  f"  L2/L1 {row['ratio']['l2_over_l1']:.2f}")  # fmt: skip
        # Were the L2 hits really L2 hits (and not misses after a Redis timeout)?
        outcomes = {}
        for name in ("l1", "l2"):
            stats = json.loads(subprocess.run(
                ["curl", "-s", f"http://127.0.0.1:{admin[name]}/stats"],
                capture_output=True, text=True, check=True,
            ).stdout)  # fmt: skip
            outcomes[name] = {k: v for k, v in stats["outcomes"].items() if v}
        print(f"outcomes: {outcomes}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    write_results(rows, args, outcomes)
    return 0


def median(rows: list[dict[str, dict[str, float]]], name: str, field: str) -> float:
    return statistics.median(row[name][field] for row in rows)


def write_results(
    rows: list[dict[str, dict[str, float]]],
    args: argparse.Namespace,
    outcomes: dict[str, dict[str, int]],
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        name: {f: median(rows, name, f) for f in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")}
        for name in ("bare", "l1", "l2")
    }
    ratios = {r: median(rows, "ratio", r) for r in ("l1_over_bare", "l2_over_l1")}
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "reps": args.reps,
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
        "command": "python bench/hitpath.py " + f"--reps {args.reps} --seconds {args.seconds}",
    }
    (RESULTS / "hitpath.json").write_text(
        json.dumps(
            {"meta": meta, "median": summary, "ratios": ratios, "outcomes": outcomes, "runs": rows},
            indent=2,
        )
    )
    labels = {
        "bare": "bare aiohttp (ceiling)",
        "l1": "cacheproxy L1 hit",
        "l2": "cacheproxy L2 hit",
    }
    lines = [
        f"Hit path, {meta['date']}, medians of {args.reps} interleaved {args.seconds} s runs "
        f"(`{meta['command']}`):",
        "",
        "| target | req/s | p50 ms | p99 ms | server CPU µs/req |",
        "|---|---|---|---|---|",
        *(
            f"| {labels[n]} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['cpu_us_per_request']:.0f} |"
            for n, s in summary.items()
        ),
        "",
        f"L1 hit / bare aiohttp: **{ratios['l1_over_bare']:.2f}x** (target 0.9x).  "
        f"L2 hit / L1 hit: **{ratios['l2_over_l1']:.2f}x** (target 0.6x).",
        "",
        f"Outcomes counted by the proxies over the whole run: L1 target {outcomes['l1']}, "
        f"L2 target {outcomes['l2']}.",
        "",
    ]
    (RESULTS / "hitpath.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
