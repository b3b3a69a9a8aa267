"""Every benchmark, one after the other, then one summary of the targets.

    python bench/run.py            # the full suite (about 30 minutes)
    python bench/run.py --quick    # each benchmark's short form (a few minutes)
    python bench/run.py hitpath market   # just these

Each benchmark writes bench/results/<name>.{md,json}; this writes bench/results/summary.md
from those JSON files, so it can also be rerun on its own (`--summary-only`). They run one at a
time because each one measures side by side within itself, and two at once would share the
machine's two cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from common import PYTHON, RESULTS, ROOT, stamp
from hitpath import REF_CPU_TARGET

BENCHMARKS = ("hitpath", "misspath", "coalesce", "memory", "market")
FULL = {"memory": ["--all-held"]}  # the full run also fills an L1 that holds 1M entries
Row = tuple[str, str, bool | None]  # target, measured, met (None: a reference, no target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick form")
    parser.add_argument("--summary-only", action="store_true", help="only rewrite summary.md")
    args = parser.parse_args()
    if unknown := set(args.names) - set(BENCHMARKS):
        parser.error(f"unknown benchmark: {', '.join(sorted(unknown))}")
    failed = []
    if not args.summary_only:
        for name in args.names or BENCHMARKS:
            argv = [PYTHON, str(ROOT / "bench" / f"{name}.py")]
            argv += ["--quick"] if args.quick else FULL.get(name, [])
            print(f"\n=== {name}: {' '.join(argv[1:])}", flush=True)
            started = time.monotonic()
            if subprocess.run(argv, cwd=ROOT).returncode != 0:
                failed.append(name)
            print(f"=== {name}: {time.monotonic() - started:.0f} s", flush=True)
    summary()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def hitpath(d: dict[str, Any]) -> list[Row]:
    r, m = d["ratios"], d["median"]
    against = []
    if "l1_over_ref_cpu" in r:  # run with --against REF
        ref = d["meta"]["against"]["ref"]
        against = [(f"L1 hit >= {REF_CPU_TARGET}x L1 hit at {ref} (CPU per request)",
                    f"{r['l1_over_ref_cpu']:.3f}x (req/s: {r['l1_over_ref']:.3f}x)",
                    r["l1_over_ref_cpu"] >= REF_CPU_TARGET)]  # fmt: skip
    return [
        ("L1 hit >= 0.9x bare aiohttp (req/s)", f"{r['l1_over_bare']:.2f}x "
         f"(CPU per request: {r['l1_over_bare_cpu']:.2f}x)", r["l1_over_bare"] >= 0.9),
        ("L2 hit >= 0.6x L1 hit (req/s)", f"{r['l2_over_l1']:.2f}x "
         f"(CPU per request: {r['l2_over_l1_cpu']:.2f}x)", r["l2_over_l1"] >= 0.6),
        ("nginx proxy_cache, 1 worker (reference)", f"{m['nginx']['rps']:.0f} req/s; "
         f"cacheproxy L1 {m['l1']['rps']:.0f}, bare aiohttp {m['bare']['rps']:.0f}", None),
        *against,
    ]  # fmt: skip


def misspath(d: dict[str, Any]) -> list[Row]:
    seq, conc = d["median"]["sequential"]["added"], d["median"]["concurrent"]["added"]
    return [
        ("miss adds <= 1 ms at p50 (one request at a time)",
         f"{seq['p50_ms']:.2f} ms (p99 {seq['p99_ms']:.1f} ms)", seq["p50_ms"] <= 1.0),
        ("... with 8 concurrent clients (reference)",
         f"{conc['p50_ms']:.2f} ms (p99 {conc['p99_ms']:.1f} ms)", None),
    ]  # fmt: skip


def coalesce(d: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for fleet, label in (("one", "one instance"), ("three", "three instances")):
        s = d["summary"][fleet]
        calls = s["upstream_calls"]
        rows.append((
            f"1 upstream call per cold key, {label} (1,000 concurrent requests)",
            f"max {max(calls)} over {len(calls)} keys; statuses {s['statuses']}",
            max(calls) == 1,
        ))  # fmt: skip
    return rows


def memory(d: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for size in ("small", "large"):
        s = d[size]
        rows.append((
            f"resident growth <= 1.3x the L1 byte limit, {s['requests']:,} {size} entries sent",
            f"{s['growth_over_limit']:.2f}x (peak {s['peak_growth_over_limit']:.2f}x)",
            s["peak_growth_over_limit"] <= 1.3,
        ))  # fmt: skip
    if held := d.get("small, all held"):
        rows.append((
            f"{held['entries']:,} small entries held (limit never reached; reference)",
            f"resident growth {held['growth'] / held['counted_bytes']:.2f}x the bytes counted",
            None,
        ))  # fmt: skip
    return rows


def market(d: dict[str, Any]) -> list[Row]:
    return [(t["target"], t["measured"], t["met"]) for t in d["targets"]]


READERS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "hitpath": hitpath, "misspath": misspath, "coalesce": coalesce, "memory": memory,
    "market": market,
}  # fmt: skip


def summary() -> None:
    lines = [
        "# Benchmark summary",
        "",
        f"Written {stamp()} by `python bench/run.py --summary-only` from the latest result of "
        "each benchmark (their own files have the method, every repetition and the command).",
        "",
        "| benchmark | target | measured | met |",
        "|---|---|---|---|",
    ]
    for name in BENCHMARKS:
        data = load(name)
        if data is None:
            lines.append(f"| {name} | (not run yet) | | |")
            continue
        when = data.get("meta", {}).get("date", "?")
        for target, measured, met in READERS[name](data):
            verdict = "" if met is None else ("yes" if met else "**no**")
            lines.append(f"| [{name}]({name}.md), {when} | {target} | {measured} | {verdict} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
