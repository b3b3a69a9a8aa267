"""Coalescing: 1,000 concurrent requests for one cold key, against one proxy and three.

The upstream is a small aiohttp app that counts its calls per path and answers after 200 ms,
so the 1,000 requests really overlap the one fetch. The proxies use the layered backend
(L1 + one shared redis-server, each fleet its own key prefix): "one" is a single instance,
"three" is three instances with the 1,000 requests spread round-robin over them, where the
instances must agree through the Redis lease on who fetches.

The client is a small raw-socket HTTP/1.1 client in this process: it opens the 1,000
keep-alive connections first, then writes the request on every connection at once (~10 ms
for all), so what is measured is coalescing, not a connection storm. For each cold key it
records every response's status, Cache-Status and latency (from its write to the last body
byte). Repetitions interleave the two fleets in a random order, several cold keys each.

    python bench/coalesce.py [--reps 3] [--keys 5] [--requests 1000] [--quick]

Writes bench/results/coalesce.json and bench/results/coalesce.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PYTHON,
    admin_json,
    free_port,
    need,
    percentile,
    processes,
    stamp,
    wait_port,
    write_results,
)

DELAY = 0.2
L2_FIELDS = ("errors", "hits", "misses", "breaker")
# Fleets and their Redis command_timeout: the default 50ms, and 1s for a fleet that shows
# what the default's timeouts under a burst cost (see the report).
FLEETS = {"one": "50ms", "three": "50ms", "three_1s": "1s"}

UPSTREAM = """
import asyncio, json, sys
from collections import Counter
from aiohttp import web
calls = Counter()
BODY = json.dumps({"symbol": "AAPL", "price": 189.25, "pad": "x" * 400}).encode()
async def handle(request):
    calls[request.path] += 1
    await asyncio.sleep(float(sys.argv[2]))
    return web.Response(body=BODY, content_type="application/json")
async def count(request):
    return web.json_response(calls)
app = web.Application()
app.router.add_get("/__calls", count)
app.router.add_get("/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            backlog=4096)
"""

CONFIG = """
server: {{host: 127.0.0.1, port: {port}, admin_port: {admin}}}
upstreams: {{api: {{url: "http://127.0.0.1:{upstream}", max_connections: 1000}}}}
ttl_classes: {{long: 1h}}
routes:
  - {{name: quote, path: "/q/{{id}}", upstream: api, ttl_class: long}}
cache:
  backend: layered
  redis: {{url: "redis://127.0.0.1:{redis}/0", key_prefix: "{prefix}:", command_timeout: {timeout}}}
"""


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readuntil(b"\r\n")
            body = b"".join(parts)
        else:
            body = b""
        return status, headers, body


async def connect(ports: list[int], count: int) -> list[Conn]:
    """`count` connections spread round-robin over ports, opened 100 at a time."""
    conns: list[Conn] = []
    for start in range(0, count, 100):
        batch = [ports[i % len(ports)] for i in range(start, min(count, start + 100))]
        pairs = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", p) for p in batch))
        conns += [Conn(r, w) for r, w in pairs]
    return conns


async def burst(conns: list[Conn], path: str) -> list[dict[str, Any]]:
    """The same GET on every connection at once; each response's status, outcome, latency."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()

    async def one(conn: Conn) -> dict[str, Any]:
        started = time.perf_counter()
        conn.writer.write(request)
        status, headers, body = await conn.response()
        return {
            "status": status,
            "outcome": outcome(headers.get("cache-status", "")),
            "ms": (time.perf_counter() - started) * 1e3,
            "body": len(body),
        }

    return await asyncio.gather(*(one(c) for c in conns))


def outcome(cache_status: str) -> str:
    """A short name for a Cache-Status value."""
    if "collapsed" in cache_status:
        return "collapsed (other instance, via L2)" if "detail=l2" in cache_status else (
            "collapsed (same instance)"
        )  # fmt: skip
    if "hit" in cache_status:
        return "hit (" + ("l2" if "detail=l2" in cache_status else "l1") + ")"
    if "fwd=miss" in cache_status and "stored" in cache_status:
        return "miss, fetched"
    return cache_status or "(no Cache-Status)"


def l2_errors(admins: list[int]) -> int:
    """Failed or timed-out Redis calls, summed over a fleet's instances."""
    return sum(int(admin_json(p)["layers"]["l2"]["errors"]) for p in admins)


def upstream_calls(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__calls", timeout=10) as resp:
        return dict(json.loads(resp.read()))


async def run(args: argparse.Namespace, ports: dict[str, Any]) -> list[dict[str, Any]]:
    fleets = {name: ports[name] for name in FLEETS}
    conns = {name: await connect(p, args.requests) for name, p in fleets.items()}
    # Warm every instance (pools, first-request code) with a key of its own.
    for name in fleets:
        await burst(conns[name], f"/q/warm-{name}")
    runs: list[dict[str, Any]] = []
    order = list(fleets)
    for rep in range(args.reps):
        random.shuffle(order)
        for name in order:
            for k in range(args.keys):
                path = f"/q/cold-{rep}-{name}-{k}"
                errors_before = l2_errors(ports["admins"][name])
                results = await burst(conns[name], path)
                await asyncio.sleep(0.3)  # let any straggling fetch land before counting
                calls = upstream_calls(ports["upstream"]).get(path, 0)
                latencies = [r["ms"] for r in results]
                row = {
                    "rep": rep,
                    "fleet": name,
                    "path": path,
                    "upstream_calls": calls,
                    "l2_errors": l2_errors(ports["admins"][name]) - errors_before,
                    "statuses": dict(Counter(str(r["status"]) for r in results)),
                    "outcomes": dict(Counter(r["outcome"] for r in results)),
                    "short_bodies": sum(1 for r in results if r["body"] == 0),
                    "ms_min": min(latencies),
                    "ms_p50": percentile(latencies, 50),
                    "ms_p99": percentile(latencies, 99),
                    "ms_max": max(latencies),
                }
                runs.append(row)
                print(f"rep {rep + 1} {name:5} {path}: {calls} upstream call(s), statuses "
                      f"{row['statuses']}, latency ms min {row['ms_min']:.0f} p50 "
                      f"{row['ms_p50']:.0f} p99 {row['ms_p99']:.0f} max {row['ms_max']:.0f}, "
                      f"{row['outcomes']}, L2 errors {row['l2_errors']}", flush=True)  # fmt: skip
    for group in conns.values():
        for conn in group:
            conn.writer.close()
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keys", type=int, default=5, help="cold keys per fleet and repetition")
    parser.add_argument("--requests", type=int, default=1000, help="concurrent requests per key")
    parser.add_argument("--quick", action="store_true", help="1 repetition of 2 keys")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.keys = 1, 2
    need("redis-server")
    tmp = Path(tempfile.mkdtemp(prefix="cacheproxy-coalesce-"))
    ports: dict[str, Any] = {"upstream": free_port(), "redis": free_port()}
    ports["one"] = [free_port()]
    ports["three"] = [free_port() for _ in range(3)]
    ports["three_1s"] = [free_port() for _ in range(3)]
    admins = {p: free_port() for fleet in FLEETS for p in ports[fleet]}
    ports["admins"] = {fleet: [admins[p] for p in ports[fleet]] for fleet in FLEETS}
    try:
        with processes() as procs:
            procs.redis(ports["redis"], core=0)
            (tmp / "upstream.py").write_text(UPSTREAM)
            procs.spawn([PYTHON, str(tmp / "upstream.py"), str(ports["upstream"]), str(DELAY)], 0)
            for fleet, timeout in FLEETS.items():
                for port in ports[fleet]:
                    config = tmp / f"proxy-{port}.yaml"
                    config.write_text(CONFIG.format(
                        port=port, admin=admins[port], upstream=ports["upstream"],
                        redis=ports["redis"], prefix=fleet, timeout=timeout,
                    ))  # fmt: skip
                    procs.proxy(config, core=1)
            for port in [ports["upstream"], ports["redis"], *admins, *admins.values()]:
                wait_port(port)
            runs = asyncio.run(run(args, ports))
            l2 = {
                fleet: [
                    {k: admin_json(admins[p])["layers"]["l2"][k] for k in L2_FIELDS}
                    for p in ports[fleet]
                ]
                for fleet in FLEETS
            }
            for proc in procs.procs[2:]:  # the proxies before Redis, so none logs its loss
                proc.terminate()
                proc.wait(timeout=10)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(runs, args, l2)
    return 0


def report(runs: list[dict[str, Any]], args: argparse.Namespace, l2: dict[str, Any]) -> None:
    command = (
        "python bench/coalesce.py "
        + ("--quick" if args.quick else f"--reps {args.reps} --keys {args.keys}")
        + ("" if args.requests == 1000 else f" --requests {args.requests}")
    )
    meta = {"date": stamp(), "command": command, "cpus": os.cpu_count(),
            "upstream_delay_s": DELAY, "requests": args.requests}  # fmt: skip
    summary: dict[str, Any] = {}
    for fleet in FLEETS:
        rows = [r for r in runs if r["fleet"] == fleet]
        statuses: Counter[str] = Counter()
        outcomes: Counter[str] = Counter()
        for r in rows:
            statuses.update(r["statuses"])
            outcomes.update(r["outcomes"])
        summary[fleet] = {
            "keys": len(rows),
            "upstream_calls": [r["upstream_calls"] for r in rows],
            "statuses": dict(statuses),
            "outcomes": dict(outcomes),
            **{
                f: statistics.median(r[f] for r in rows)
                for f in ("ms_min", "ms_p50", "ms_p99", "ms_max")
            },
            "l2_errors": [r["l2_errors"] for r in rows],
        }
    label = {
        "one": "one instance",
        "three": "three instances, one Redis",
        "three_1s": "three instances, Redis `command_timeout: 1s`",
    }
    lines = [
        f"Coalescing, {meta['date']} (`{command}`): {args.requests} concurrent requests for "
        f"one cold key, upstream answering after {DELAY * 1000:.0f} ms; {args.keys} cold keys "
        f"per fleet in each of {args.reps} interleaved repetitions. Layered backend (L1 + one "
        "shared redis-server). Latency from the request's write to its last byte; the "
        "columns are medians over the cold keys.",
        "",
        "| fleet | cold keys | upstream calls per key | statuses | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for fleet, s in summary.items():
        calls = Counter(s["upstream_calls"])
        per_key = ", ".join(f"{n}: {c} keys" for n, c in sorted(calls.items()))
        status = ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items()))
        lines.append(
            f"| {label[fleet]} | {s['keys']} | {per_key} | {status} | {s['ms_p50']:.0f} | "
            f"{s['ms_p99']:.0f} | {s['ms_max']:.0f} |"
        )
    lines += ["", "How the requests were answered (Cache-Status), over all cold keys:", ""]
    for fleet, s in summary.items():
        lines.append(f"- {label[fleet]}: " + ", ".join(
            f"{k} {v}" for k, v in sorted(s["outcomes"].items(), key=lambda kv: -kv[1])
        ))  # fmt: skip
    worst = {fleet: max(s["upstream_calls"]) for fleet, s in summary.items()}
    lines += [
        "",
        "Target: 1 upstream call per cold key, per fleet. "
        + "; ".join(
            f"{label[f]}: at most {worst[f]} ({'met' if worst[f] == 1 else 'missed'})"
            for f in summary
        )
        + ".",
        "",
        "L2 errors (Redis calls that failed or timed out) during each cold key's burst: "
        + "; ".join(f"{label[f]}: {s['l2_errors']}" for f, s in summary.items())
        + f". Each instance's L2 counters at the end: {l2}.",
    ]
    for fleet in FLEETS:
        rows = [r for r in runs if r["fleet"] == fleet]
        extra = [i for i, r in enumerate(rows) if r["upstream_calls"] > 1]
        if not extra:
            continue
        # A failed L2 read makes an instance skip the lease for the next second (leases.py
        # _RECENT), which covers this key's burst and the next key's (0.3 s apart).
        after_error = [
            i for i in extra if rows[i]["l2_errors"] or (i > 0 and rows[i - 1]["l2_errors"])
        ]
        lines += [
            "",
            f"{label[fleet]}: {len(extra)} of {len(rows)} cold keys took more than one "
            f"upstream call; {len(after_error)} of them came during or right after (< 1 s) a "
            "burst in which Redis calls failed. Those failures are the 50 ms command timeout "
            "expiring while the instance's own event loop is busy with its share of the "
            "burst (three instances share one core here): after a failed L2 read an "
            "instance fetches without taking the lease for 1 s, so it fetches itself.",
        ]
        if others := [rows[i]["path"] for i in extra if i not in after_error]:
            lines.append(
                f"No Redis failure came near the other {len(others)} ({', '.join(others)}): "
                "see the outcomes of those keys in coalesce.json."
            )
    write_results("coalesce", {"meta": meta, "summary": summary, "runs": runs}, "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
