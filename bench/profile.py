"""Where an L1 hit's time goes: py-spy samples a cacheproxy process while wrk drives hits.

    python bench/profile.py [--seconds 8] [--backend memory|redis]

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

from common import PYTHON, free_port, need, pinned, processes, stamp, wait_port, write_results
from hitpath import BARE, CONFIG, PATH


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--backend", choices=("memory", "redis"), default="memory")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    need("wrk", "redis-server")
    if not shutil.which("py-spy"):
        raise SystemExit("bench/profile.py needs py-spy (pip install py-spy)")
    tmp = Path(tempfile.mkdtemp(prefix="cacheproxy-profile-"))
    port, admin, upstream, redis = (free_port() for _ in range(4))
    raw = tmp / "samples.txt"
    with processes() as procs:
        (tmp / "bare.py").write_text(BARE)
        procs.spawn([PYTHON, str(tmp / "bare.py"), str(upstream)], core=0)
        procs.redis(redis, core=0)
        config = tmp / "proxy.yaml"
        config.write_text(CONFIG.format(port=port, admin=admin, upstream=upstream,
                                        backend=args.backend, redis=redis))  # fmt: skip
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
            pinned(0, ["wrk", "-t1", "-c64", f"-d{args.seconds + 1}s",
                       f"http://127.0.0.1:{port}{PATH}"]),
            check=True, capture_output=True,
        )  # fmt: skip
        spy.wait(timeout=60)
    inclusive, own, total = aggregate(raw.read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    command = f"python bench/profile.py --seconds {args.seconds} --backend {args.backend}"
    lines = [
        f"Profile of cacheproxy {'L1' if args.backend == 'memory' else 'L2'} hits, {stamp()} "
        f"(`{command}`): {total} py-spy samples at 500 Hz while wrk -c64 sent hits.",
        "",
        "| inclusive | function |",
        "|---|---|",
        *(f"| {100 * n / total:.1f}% | `{name}` |" for name, n in inclusive.most_common(args.top)),
        "",
        "| self | function |",
        "|---|---|",
        *(f"| {100 * n / total:.1f}% | `{name}` |" for name, n in own.most_common(args.top)),
    ]
    write_results("profile", {"meta": {"date": stamp(), "command": command, "samples": total},
                              "inclusive": dict(inclusive), "self": dict(own)},
                  "\n".join(lines))  # fmt: skip
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
