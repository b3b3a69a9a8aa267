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

    python bench/hitpath.py [--reps 5] [--seconds 5] [--against REF]

With --against REF (a commit, branch or tag), REF's cacheproxy runs beside this checkout's as
two more targets, l1-ref and l2-ref: its tree is copied once per commit with `git archive`
into the temp directory, and served by the same interpreter with the same config (but its
own redis-server: the two share no keys and no backplane messages). Each
target and its reference run back to back, and the report adds this checkout's L1 and L2 hit
over REF's, by req/s and by CPU per request: "no slower than before" measured in one run.

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
    ROOT,
    clean,
    cpu_seconds,
    free_port,
    need,
    nginx,
    parse_wrk,
    pinned,
    processes,
    reference_tree,
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
PROXIES = {"l1": "memory", "l2": "redis"}  # target -> cache backend
REF_CPU_TARGET = 0.97  # issue 12: the L1 hit within 3% of before, by CPU per request

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
    parser.add_argument(
        "--against", metavar="REF", help="also run REF's cacheproxy (a commit, branch) side by side"
    )
    args = parser.parse_args()
    if args.quick:
        args.reps, args.seconds = 3, 2
    need("wrk", "redis-server", "nginx")
    trees: dict[str, Path | None] = dict.fromkeys(PROXIES)
    targets, labels, ref = TARGETS, LABELS, None
    if args.against:
        commit, tree = reference_tree(args.against)
        ref = {"ref": args.against, "commit": commit, "tree": str(tree), **head()}
        trees |= {f"{name}-ref": tree for name in PROXIES}
        targets = (*TARGETS, "l1-ref", "l2-ref")
        labels = {**LABELS, **{f"{n}-ref": f"{LABELS[n]}, {args.against}" for n in PROXIES}}
    tmp = Path(tempfile.mkdtemp(prefix="cacheproxy-bench-"))
    redises = ["redis", *(["redis-ref"] if ref else [])]
    ports = {name: free_port() for name in (*targets, "upstream", *redises)}
    admin = {name: free_port() for name in trees}
    with processes() as procs:
        (tmp / "bare.py").write_text(BARE)
        for name in redises:  # the reference gets its own: no shared keys nor backplane
            procs.redis(ports[name], core=0)
        procs.spawn([PYTHON, str(tmp / "bare.py"), str(ports["upstream"])], core=0)
        servers = {
            "bare": procs.spawn([PYTHON, str(tmp / "bare.py"), str(ports["bare"])], core=1),
            "nginx": nginx(procs, tmp / "nginx", ports["nginx"], ports["upstream"], core=1,
                           extra=NGINX_EXTRA),
        }  # fmt: skip
        for name, tree in trees.items():
            path = tmp / f"{name}.yaml"
            path.write_text(CONFIG.format(
                port=ports[name], admin=admin[name], upstream=ports["upstream"],
                backend=PROXIES[name.removesuffix("-ref")],
                redis=ports["redis-ref" if tree else "redis"],
            ))  # fmt: skip
            servers[name] = procs.proxy(path, core=1, tree=tree)
        for port in ports.values():
            wait_port(port)
        workers = {**{n: p.pid for n, p in servers.items()}, "nginx": nginx_worker(tmp)}
        for name in targets:  # fill the caches, and check each serves the body
            out = subprocess.run(
                ["curl", "-s", "-D", "-", f"http://127.0.0.1:{ports[name]}{PATH}"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            assert '"x": "aaaa' in out, (name, out[:300])
        time.sleep(0.5)  # let the L2 write land before measuring L2 hits
        rows = [measure(rep, targets, ports, workers, args.seconds) for rep in range(args.reps)]
        outcomes = {name: proxy_outcomes(port) for name, port in admin.items()}
    report(rows, args, outcomes, labels, ref)
    return 0


def head() -> dict[str, Any]:
    """This checkout's commit, and what in proxy/ differs from it (`git status` lines)."""

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip

    return {"head": git("rev-parse", "HEAD"), "changes": git("status", "--porcelain", "proxy")}


def nginx_worker(directory: Path) -> int:
    """The pid of nginx's one worker (the master only forks it): that is where CPU goes."""
    master = int((directory / "nginx" / "nginx.pid").read_text())
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def measure(
    rep: int, targets: tuple[str, ...], ports: dict[str, int], pids: dict[str, int], seconds: int
) -> dict[str, Any]:
    """One repetition: every target once, in a random order."""
    row: dict[str, Any] = {}
    order = schedule(targets)
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
          f"{row[n]['cpu_us_per_request']:.1f}us" for n in targets) + "  " +
          "  ".join(f"{k} {v:.2f}" for k, v in row["ratio"].items()))  # fmt: skip
    return row


def schedule(targets: tuple[str, ...]) -> list[str]:
    """The targets in a random order, each reference (l1-ref) right before or after its own
    target (l1): the two then share whatever else the machine is doing at that moment."""
    groups = [[n, *([f"{n}-ref"] if f"{n}-ref" in targets else [])]
              for n in targets if not n.endswith("-ref")]  # fmt: skip
    random.shuffle(groups)
    for group in groups:
        random.shuffle(group)
    return [name for group in groups for name in group]


def ratios(row: dict[str, dict[str, float]]) -> dict[str, float]:
    """Throughput ratios, and the same comparisons by CPU cost per request (inverted, so
    that for both, higher is better for cacheproxy)."""
    rps = {n: stats["rps"] for n, stats in row.items()}
    cpu = {n: stats["cpu_us_per_request"] for n, stats in row.items()}
    out = {
        "l1_over_bare": rps["l1"] / rps["bare"],
        "l1_over_bare_cpu": cpu["bare"] / cpu["l1"],
        "l2_over_l1": rps["l2"] / rps["l1"],
        "l2_over_l1_cpu": cpu["l1"] / cpu["l2"],
        "l1_over_nginx": rps["l1"] / rps["nginx"],
    }
    for n in PROXIES:
        if f"{n}-ref" in row:
            out[f"{n}_over_ref"] = rps[n] / rps[f"{n}-ref"]
            out[f"{n}_over_ref_cpu"] = cpu[f"{n}-ref"] / cpu[n]
    return out


def proxy_outcomes(admin_port: int) -> dict[str, int]:
    """The proxy's own count of outcomes: were the L2 hits really L2 hits?"""
    stats = json.loads(subprocess.run(
        ["curl", "-s", f"http://127.0.0.1:{admin_port}/stats"],
        capture_output=True, text=True, check=True,
    ).stdout)  # fmt: skip
    return {k: v for k, v in stats["outcomes"].items() if v}


def report(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    outcomes: Any,
    labels: dict[str, str],
    ref: dict[str, Any] | None,
) -> None:
    fields = ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")
    summary = {n: {f: statistics.median(r[n][f] for r in rows) for f in fields} for n in labels}
    ratio = {k: statistics.median(r["ratio"][k] for r in rows) for k in rows[0]["ratio"]}
    command = f"python bench/hitpath.py --reps {args.reps} --seconds {args.seconds}"
    meta: dict[str, Any] = {"date": stamp(), "reps": args.reps, "seconds": args.seconds}
    if ref is not None:
        command += f" --against {ref['ref']}"
        meta["against"] = ref
    meta["command"] = command
    lines = [
        f"Hit path, {meta['date']}, medians of {args.reps} interleaved {args.seconds} s runs "
        f"(`{command}`), wrk -t1 -c64 on core 0, each server on core 1:",
        "",
        "| target | req/s | p50 ms | p99 ms | server CPU µs/req |",
        "|---|---|---|---|---|",
        *(
            f"| {labels[n]} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
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
        *([] if ref is None else against(ref, ratio)),
        "",
        f"Outcomes counted by the proxies over the whole run: L1 target {outcomes['l1']}, "
        f"L2 target {outcomes['l2']}.",
    ]
    if ref is not None:
        lines[-1] += (
            f" At `{ref['ref']}`: L1 target {outcomes['l1-ref']}, L2 target {outcomes['l2-ref']}."
        )
        lines[1:1] = [
            "",
            f"This checkout is at {ref['head'][:12]}"
            + (" plus uncommitted changes in proxy/" if ref["changes"] else "")
            + f"; the reference `{ref['ref']}` is {ref['commit'][:12]}, served from "
            f"`git archive` in {ref['tree']}. Each target runs right before or after its "
            "reference.",
        ]
    data = {"meta": meta, "median": summary, "ratios": ratio, "outcomes": outcomes, "runs": rows}
    write_results("hitpath", data, "\n".join(lines))


def against(ref: dict[str, Any], ratio: dict[str, float]) -> list[str]:
    """The ratio rows for this checkout over the reference commit's proxy."""
    at = f"at `{ref['ref']}`"
    return [
        f"| L1 hit / L1 hit {at} | {ratio['l1_over_ref']:.3f}x | "
        f"**{ratio['l1_over_ref_cpu']:.3f}x** | >= {REF_CPU_TARGET}x by CPU |",
        f"| L2 hit / L2 hit {at} | {ratio['l2_over_ref']:.3f}x | "
        f"{ratio['l2_over_ref_cpu']:.3f}x | (reference) |",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
