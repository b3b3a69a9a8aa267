"""Hit-path throughput: cacheproxy L1 and L2 hits against bare aiohttp and nginx proxy_cache.

Every target serves the same ~2 KB JSON body:
- bare aiohttp (with uvloop): returns pre-built bytes from a dict, the ceiling for any
  aiohttp proxy;
- nginx proxy_cache, 1 worker, in front of the same upstream (every request a cache hit);
- cacheproxy with the memory backend (L1 hits);
- cacheproxy with the redis backend (L2 hits: no L1, one Redis GET per request).

wrk (1 thread, 64 connections) runs on core 0 and the server under test on core 1
(taskset); the upstream and redis-server share wrk's core. Targets are interleaved within
each repetition and the ratios are computed inside a repetition, then the median is
reported: these machines are shared and noisy, so a lone absolute number means little.
Besides req/s, the server's CPU time per request is measured from /proc: it is less
disturbed by other work on the machine than throughput is.

    python bench/hitpath.py [--reps 5] [--seconds 5]

Writes bench/results/hitpath.json and bench/results/hitpath.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    clean,
    cpu_seconds,
    free_port,
    need,
    nginx,
    parse_wrk,
    pinned,
    processes,
    stamp,
    wait_port,
    write_results,
)

PATH = "/quote/AAPL"
TARGETS = ("bare", "nginx", "l1", "l2")
LABELS = {
    "bare": "bare aiohttp + uvloop (ceiling)",
    "nginx": "nginx proxy_cache, 1 worker",
    "l1": "cacheproxy L1 hit",
    "l2": "cacheproxy L2 hit (no L1)",
}

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

# The upstream says max-age=1; like cacheproxy's fixed 1 h class, nginx keeps it for an hour.
NGINX_EXTRA = "proxy_ignore_headers Cache-Control Expires;"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 2 s")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.seconds = 3, 2
    need("wrk", "redis-server", "nginx")
    tmp = Path(tempfile.mkdtemp(prefix="cacheproxy-bench-"))
    ports = {name: free_port() for name in (*TARGETS, "upstream", "redis")}
    admin = {name: free_port() for name in ("l1", "l2")}
    with processes() as procs:
        (tmp / "bare.py").write_text(BARE)
        procs.redis(ports["redis"], core=0)
        procs.spawn([PYTHON, str(tmp / "bare.py"), str(ports["upstream"])], core=0)
        servers = {
            "bare": procs.spawn([PYTHON, str(tmp / "bare.py"), str(ports["bare"])], core=1),
            "nginx": nginx(procs, tmp / "nginx", ports["nginx"], ports["upstream"], core=1,
                           extra=NGINX_EXTRA),
        }  # fmt: skip
        for name, backend in (("l1", "memory"), ("l2", "redis")):
            path = tmp / f"{name}.yaml"
            path.write_text(CONFIG.format(
                port=ports[name], admin=admin[name], upstream=ports["upstream"],
                backend=backend, redis=ports["redis"],
            ))  # fmt: skip
            servers[name] = procs.proxy(path, core=1)
        for port in ports.values():
            wait_port(port)
        workers = {**{n: p.pid for n, p in servers.items()}, "nginx": nginx_worker(tmp)}
        for name in TARGETS:  # fill the caches, and check each serves the body
            out = subprocess.run(
                ["curl", "-s", "-D", "-", f"http://127.0.0.1:{ports[name]}{PATH}"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            assert '"x": "aaaa' in out, (name, out[:300])
        time.sleep(0.5)  # let the L2 write land before measuring L2 hits
        rows = [measure(rep, ports, workers, args.seconds) for rep in range(args.reps)]
        outcomes = {name: proxy_outcomes(admin[name]) for name in ("l1", "l2")}
    report(rows, args, outcomes)
    return 0


def nginx_worker(directory: Path) -> int:
    """The pid of nginx's one worker (the master only forks it): that is where CPU goes."""
    master = int((directory / "nginx" / "nginx.pid").read_text())
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def measure(rep: int, ports: dict[str, int], pids: dict[str, int], seconds: int) -> dict[str, Any]:
    """One repetition: every target once, in a random order."""
    order = list(TARGETS)
    random.shuffle(order)
    row: dict[str, Any] = {}
    for name in order:
        cpu_before = cpu_seconds(pids[name])
        out = subprocess.run(
            pinned(0, ["wrk", "-t1", "-c64", f"-d{seconds}s", "--latency",
                       f"http://127.0.0.1:{ports[name]}{PATH}"]),
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        stats = clean(name, parse_wrk(out), out)
        cpu = cpu_seconds(pids[name]) - cpu_before
        stats["cpu_us_per_request"] = cpu / max(1.0, stats["requests"]) * 1e6
        row[name] = stats
    row["ratio"] = ratios(row)
    print(f"rep {rep + 1}: " + "  ".join(f"{n} {row[n]['rps']:.0f}/s "
          f"{row[n]['cpu_us_per_request']:.1f}us" for n in TARGETS) + "  " +
          "  ".join(f"{k} {v:.2f}" for k, v in row["ratio"].items()))  # fmt: skip
    return row


def ratios(row: dict[str, dict[str, float]]) -> dict[str, float]:
    """Throughput ratios, and the same comparisons by CPU cost per request (inverted, so
    that for both, higher is better for cacheproxy)."""
    rps = {n: row[n]["rps"] for n in TARGETS}
    cpu = {n: row[n]["cpu_us_per_request"] for n in TARGETS}
    return {
        "l1_over_bare": rps["l1"] / rps["bare"],
        "l1_over_bare_cpu": cpu["bare"] / cpu["l1"],
        "l2_over_l1": rps["l2"] / rps["l1"],
        "l2_over_l1_cpu": cpu["l1"] / cpu["l2"],
        "l1_over_nginx": rps["l1"] / rps["nginx"],
    }


def proxy_outcomes(admin_port: int) -> dict[str, int]:
    """The proxy's own count of outcomes: were the L2 hits really L2 hits?"""
    stats = json.loads(subprocess.run(
        ["curl", "-s", f"http://127.0.0.1:{admin_port}/stats"],
        capture_output=True, text=True, check=True,
    ).stdout)  # fmt: skip
    return {k: v for k, v in stats["outcomes"].items() if v}


def report(rows: list[dict[str, Any]], args: argparse.Namespace, outcomes: Any) -> None:
    fields = ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")
    summary = {n: {f: statistics.median(r[n][f] for r in rows) for f in fields} for n in TARGETS}
    ratio = {k: statistics.median(r["ratio"][k] for r in rows) for k in rows[0]["ratio"]}
    command = f"python bench/hitpath.py --reps {args.reps} --seconds {args.seconds}"
    meta = {"date": stamp(), "reps": args.reps, "seconds": args.seconds, "command": command}
    lines = [
        f"Hit path, {meta['date']}, medians of {args.reps} interleaved {args.seconds} s runs "
        f"(`{command}`), wrk -t1 -c64 on core 0, each server on core 1:",
        "",
        "| target | req/s | p50 ms | p99 ms | server CPU µs/req |",
        "|---|---|---|---|---|",
        *(
            f"| {LABELS[n]} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['cpu_us_per_request']:.1f} |"
            for n, s in summary.items()
        ),
        "",
        "| ratio (median of per-repetition ratios) | by req/s | by CPU per request | target |",
        "|---|---|---|---|",
        f"| L1 hit / bare aiohttp | **{ratio['l1_over_bare']:.2f}x** | "
        f"{ratio['l1_over_bare_cpu']:.2f}x | >= 0.9x |",
        f"| L2 hit / L1 hit | **{ratio['l2_over_l1']:.2f}x** | {ratio['l2_over_l1_cpu']:.2f}x "
        "| >= 0.6x |",
        f"| L1 hit / nginx | {ratio['l1_over_nginx']:.2f}x | | (reference) |",
        "",
        f"Outcomes counted by the proxies over the whole run: L1 target {outcomes['l1']}, "
        f"L2 target {outcomes['l2']}.",
    ]
    data = {"meta": meta, "median": summary, "ratios": ratio, "outcomes": outcomes, "runs": rows}
    write_results("hitpath", data, "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
