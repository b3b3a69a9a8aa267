"""Where an L1 hit's time goes: py-spy samples a cacheproxy process while wrk drives hits.

    python bench/profile.py [--seconds 8] [--backend memory|redis] [--miss]

--miss profiles misses instead: every request a new path, in front of nginx serving a
fixed body (as bench/misspath.py measures them).

Needs py-spy (`pip install py-spy`; it reads another process's stacks, so it may need root or
ptrace permission) and wrk. Prints the functions with the largest share of samples, inclusive
(the function and what it calls) and by self time, and writes bench/results/profile.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import (
    PYTHON,
    free_port,
    need,
    nginx_fixed,
    pinned,
    processes,
    stamp,
    unique_paths_lua,
    wait_port,
    write_results,
)
from hitpath import BARE, CONFIG, PATH
from misspath import BODY


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--backend", choices=("memory", "redis"), default="memory")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--miss", action="store_true", help="profile misses, not hits")
    args = parser.parse_args()
    need("wrk", "redis-server")
    if not shutil.which("py-spy"):
        raise SystemExit("bench/profile.py needs py-spy (pip install py-spy)")
    tmp = Path(tempfile.mkdtemp(prefix="cacheproxy-profile-"))
    port, admin, upstream, redis = (free_port() for _ in range(4))
    raw = tmp / "samples.txt"
    with processes() as procs:
        if args.miss:
            nginx_fixed(procs, tmp / "nginx", upstream, [BODY], core=0)
        else:
            (tmp / "bare.py").write_text(BARE)
            procs.spawn([PYTHON, str(tmp / "bare.py"), str(upstream)], core=0)
        procs.redis(redis, core=0)
        config = tmp / "proxy.yaml"
        config.write_text(CONFIG.format(port=port, admin=admin, upstream=upstream,
                                        backend=args.backend, redis=redis))  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        lua = ["-s", str(unique_paths_lua(tmp)), f"{url}/quote/", "--", "/quote/", "m"]
        load = lua if args.miss else [f"{url}{PATH}"]
        proxy = procs.proxy(config, core=1)
        for p in (port, upstream, redis):
            wait_port(p)
        subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}{PATH}"],
                       check=True)  # fmt: skip
        time.sleep(0.5)
        spy = subprocess.Popen(
            ["py-spy", "record", "-p", str(proxy.pid), "-d", str(args.seconds), "-r", "500",
             "--format", "raw", "-o", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run(
            pinned(0, ["wrk", "-t1", f"-c{8 if args.miss else 64}", f"-d{args.seconds + 1}s",
                       *load]),
            check=True, capture_output=True,
        )  # fmt: skip
        spy.wait(timeout=60)
    inclusive, own, total = aggregate(raw.read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    command = f"python bench/profile.py --seconds {args.seconds} --backend {args.backend}"
    what = "misses" if args.miss else f"{'L1' if args.backend == 'memory' else 'L2'} hits"
    command += " --miss" if args.miss else ""
    lines = [
        f"Profile of cacheproxy {what}, {stamp()} (`{command}`): {total} py-spy samples at "
        f"500 Hz while wrk sent requests.",
        "",
        "| inclusive | function |",
        "|---|---|",
        *(f"| {100 * n / total:.1f}% | `{name}` |" for name, n in inclusive.most_common(args.top)),
        "",
        "| self | function |",
        "|---|---|",
        *(f"| {100 * n / total:.1f}% | `{name}` |" for name, n in own.most_common(args.top)),
    ]
    meta = {"date": stamp(), "command": command, "samples": total}
    data = {"meta": meta, "inclusive": dict(inclusive), "self": dict(own)}
    write_results("profile-miss" if args.miss else "profile", data, "\n".join(lines))
    return 0


# Frames at the bottom of every sample: the interpreter, the event loop, the CLI.
_EVERY_SAMPLE = ("runpy", "asyncio/runners", "uvloop", "proxy/cli.py", "proxy/__main__.py")


def aggregate(samples: str) -> tuple[Counter[str], Counter[str], int]:
    """py-spy's raw format (`frame;frame;... count` per line) -> inclusive and self counts
    per function, without the frames every sample shares (interpreter and event loop)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in samples.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = [frame.split(":")[0] + ")" if " (" in frame else frame
                 for frame in stack.split(";")]  # fmt: skip
        for name in set(names):
            if not any(common in name for common in _EVERY_SAMPLE):
                inclusive[name] += n
        own[names[-1]] += n
    return inclusive, own, total


if __name__ == "__main__":
    raise SystemExit(main())
