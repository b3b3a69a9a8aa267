"""Memory: resident memory of a proxy whose L1 is filled far past its byte limit.

Two fills, each in a fresh proxy process (memory backend, `cache.l1.max_memory` the limit,
`max_entries` high enough that the byte limit is the one that binds):

- small: 1,000,000 distinct entries with 100-300 B bodies (quote-sized);
- large: 10,000 distinct entries with 50-200 KB bodies (chart-sized).

The upstream is nginx answering every path with a fixed body whose size cycles with the
path's last digit, and wrk (one thread, 16 connections, a Lua script numbering paths) makes
every request a distinct key, so every request is a miss that is stored in L1 and, once L1
is full, evicts the least recently used entries. The baseline is the proxy's resident set
after a warm-up (a few thousand misses, then `POST /clear`), so it includes the imports,
buffers and pools that any running proxy has. Resident memory is sampled after each tenth of
the fill; the report gives the growth over the baseline against the configured limit.
Memory is not timing: one fill per kind, with the curve, rather than repetitions.

    python bench/memory.py [--small 1000000] [--large 10000] [--limit-mb 200] [--quick]

Writes bench/results/memory.json and bench/results/memory.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    admin_json,
    free_port,
    need,
    nginx_fixed,
    parse_wrk,
    pinned,
    processes,
    rss_bytes,
    stamp,
    unique_paths_lua,
    wait_port,
    write_results,
    wrk_until,
)

CONFIG = """
server: {{host: 127.0.0.1, port: {port}, admin_port: {admin}}}
upstreams:
  api: {{url: "http://127.0.0.1:{upstream}"}}
  warm: {{url: "http://127.0.0.1:{warm}"}}
ttl_classes: {{long: 1h}}
routes:
  - {{name: quote, path: "/q/{{id}}", upstream: api, ttl_class: long}}
  - {{name: warm, path: "/w/{{id}}", upstream: warm, ttl_class: long}}
cache:
  backend: memory
  l1: {{max_entries: {max_entries}, max_memory: {limit}}}
"""

MB = 1024 * 1024


def bodies(low: int, high: int) -> list[bytes]:
    """Ten JSON bodies whose sizes step evenly from low to high bytes."""
    out = []
    for i in range(10):
        size = low + (high - low) * i // 9
        head = b'{"symbol": "AAPL", "price": 189.25, "pad": "'
        out.append(head + b"x" * max(0, size - len(head) - 2) + b'"}')
    return out


def sets(admin: int) -> int:
    """Entries the proxy has stored in L1 since it started."""
    return int(admin_json(admin)["layers"]["l1"]["sets"])


def fill(
    lua: Path, port: int, admin: int, pid: int, total: int, steps: int, base: str, prefix: str
) -> list[dict[str, Any]]:
    """Send `total` distinct misses in `steps` wrk runs; sample RSS and L1 after each."""
    samples = []
    sent = 0
    for step in range(steps):
        chunk = total // steps + (1 if step < total % steps else 0)
        argv = ["wrk", "-t1", "-c16", "-d600s", "--latency", "-s", str(lua),
                f"http://127.0.0.1:{port}", "--", base, f"{prefix}{step}-", str(chunk)]  # fmt: skip
        goal = sets(admin) + chunk
        out = wrk_until(pinned(0, argv), lambda goal=goal: sets(admin) >= goal)
        stats = parse_wrk(out)
        sent += int(stats["requests"])
        l1 = admin_json(admin)["layers"]["l1"]
        sample = {
            "requests": sent,
            "rss": rss_bytes(pid),
            "entries": l1["entries"],
            "counted_bytes": l1["bytes"],
            "evictions": l1["evictions"],
            "non_2xx": stats["non_2xx"],
            "rps": stats["rps"],
        }
        samples.append(sample)
        print(f"  {sent} requests: rss {sample['rss'] / MB:.0f} MB, L1 {sample['entries']} "
              f"entries, {sample['counted_bytes'] / MB:.0f} MB counted, {stats['rps']:.0f} "
              "req/s", flush=True)  # fmt: skip
    return samples


def run_kind(
    kind: str, body_range: tuple[int, int], total: int, limit: int, tmp: Path
) -> dict[str, Any]:
    """One fresh upstream and proxy, a warm-up, a baseline, then the fill."""
    ports = {name: free_port() for name in ("upstream", "warm", "proxy", "admin")}
    directory = tmp / kind.replace(" ", "-").replace(",", "")
    directory.mkdir()
    with processes() as procs:
        sizes = bodies(*body_range)
        nginx_fixed(procs, directory / "nginx", ports["upstream"], sizes, core=0)
        # The warm-up goes to its own route and upstream with small bodies: warming up with
        # large ones would leave freed heap in the baseline for the fill to reuse.
        nginx_fixed(procs, directory / "warm", ports["warm"], bodies(100, 300), core=0)
        config = directory / "proxy.yaml"
        config.write_text(CONFIG.format(
            port=ports["proxy"], admin=ports["admin"], upstream=ports["upstream"],
            warm=ports["warm"], max_entries=max(total * 2, 1000), limit=limit,
        ))  # fmt: skip
        proxy = procs.proxy(config, core=1)
        for port in ports.values():
            wait_port(port)
        lua = unique_paths_lua(directory)
        fill(lua, ports["proxy"], ports["admin"], proxy.pid, 3000, 1, "/w/", "warm-")
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports['admin']}/clear", method="POST", data=b""
        )
        urllib.request.urlopen(request, timeout=10).read()
        time.sleep(1)
        baseline = rss_bytes(proxy.pid)
        print(f"{kind}: baseline rss {baseline / MB:.0f} MB, filling with {total} entries of "
              f"{body_range[0]}-{body_range[1]} B against a {limit / MB:.0f} MB limit",
              flush=True)  # fmt: skip
        samples = fill(lua, ports["proxy"], ports["admin"], proxy.pid, total, 10, "/q/", "fill-")
        time.sleep(1)
        final = rss_bytes(proxy.pid)
        l1 = admin_json(ports["admin"])["layers"]["l1"]
        outcomes = {k: v for k, v in admin_json(ports["admin"])["outcomes"].items() if v}
    growth = final - baseline
    entries = max(1, l1["entries"])
    return {
        "body_bytes": list(body_range),
        "mean_body_bytes": sum(len(b) for b in sizes) / len(sizes),
        "requests": total,
        "limit_bytes": limit,
        "baseline_rss": baseline,
        "final_rss": final,
        "growth": growth,
        "growth_over_limit": growth / limit,
        "peak_growth_over_limit": (max(s["rss"] for s in samples) - baseline) / limit,
        "entries": l1["entries"],
        "counted_bytes": l1["bytes"],
        "evictions": l1["evictions"],
        "rss_per_entry": growth / entries,
        "counted_per_entry": l1["bytes"] / entries,
        "outcomes": outcomes,
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--small", type=int, default=1_000_000, help="small entries to send")
    parser.add_argument("--large", type=int, default=10_000, help="large entries to send")
    parser.add_argument("--limit-mb", type=int, default=200, help="cache.l1.max_memory")
    parser.add_argument("--quick", action="store_true", help="100k small, 2k large, 40 MB")
    parser.add_argument("--all-held", action="store_true",
                        help="also fill an L1 big enough to hold all --small entries")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.small, args.large, args.limit_mb = 100_000, 2_000, 40
    need("wrk", "nginx")
    gc.collect()
    limit = args.limit_mb * MB
    tmp = Path(tempfile.mkdtemp(prefix="cacheproxy-memory-"))
    try:
        results = {
            "small": run_kind("small", (100, 300), args.small, limit, tmp),
            "large": run_kind("large", (50_000, 200_000), args.large, limit, tmp),
        }
        if args.all_held:  # L1 large enough to keep every small entry: 1M entries held
            roomy = args.small * 4 * 1024
            results["small, all held"] = run_kind("small, all held", (100, 300), args.small,
                                                  roomy, tmp)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)
    return 0


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    command = "python bench/memory.py " + (
        "--quick"
        if args.quick
        else f"--small {args.small} --large {args.large} --limit-mb {args.limit_mb}"
        + (" --all-held" if args.all_held else "")
    )
    bounded = {kind: r for kind, r in results.items() if kind != "small, all held"}
    meta = {"date": stamp(), "command": command, "cpus": os.cpu_count(),
            "python": sys.version.split()[0]}  # fmt: skip
    lines = [
        f"L1 memory, {meta['date']} (`{command}`). A fresh proxy per row, L1 limited to "
        f"{args.limit_mb} MB (`cache.l1.max_memory`), filled through HTTP with distinct keys "
        "(every request a stored miss). Growth is resident memory (VmRSS) after the fill minus "
        "the same process's baseline after a warm-up.",
        "",
        "| entries sent | body | L1 entries held | counted MB | RSS growth MB | growth / limit "
        "| growth / counted | RSS per entry | counted per entry |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        low, high = r["body_bytes"]
        body = f"{low}-{high} B" if high < 10_000 else f"{low // 1000}-{high // 1000} KB"
        lines.append(
            f"| {r['requests']:,} {kind} | {body} | {r['entries']:,} | "
            f"{r['counted_bytes'] / MB:.0f} | {r['growth'] / MB:.0f} | "
            f"{'**' + format(r['growth_over_limit'], '.2f') + 'x**' if kind in bounded else ''}"
            f" | {r['growth'] / r['counted_bytes']:.2f}x | {r['rss_per_entry']:,.0f} B | "
            f"{r['counted_per_entry']:,.0f} B |"
        )
    lines += [
        "",
        "Target: resident memory growth <= 1.3x the configured L1 byte limit. "
        + "; ".join(
            f"{kind}: {r['growth_over_limit']:.2f}x "
            f"({'met' if r['growth_over_limit'] <= 1.3 else 'missed'}; peak during the fill "
            f"{r['peak_growth_over_limit']:.2f}x)"
            for kind, r in bounded.items()
        )
        + ".",
        "",
        "Resident memory over the fill (MB over baseline, after each tenth):",
        "",
        *(
            f"- {kind}: "
            + ", ".join(f"{(s['rss'] - r['baseline_rss']) / MB:.0f}" for s in r["samples"])
            for kind, r in results.items()
        ),
    ]
    if held := results.get("small, all held"):
        lines.append(
            f"\nWith room for all of them (`--all-held`; the limit is never reached), "
            f"{held['entries']:,} small entries held: resident memory grew "
            f"{held['growth'] / MB:,.0f} MB for {held['counted_bytes'] / MB:,.0f} MB counted "
            f"({held['growth'] / held['counted_bytes']:.2f}x)."
        )
    write_results("memory", {"meta": meta, **results}, "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
