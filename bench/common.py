"""Pieces every benchmark shares: free ports, pinned processes, wrk output, result files.

These machines are shared and noisy, so every benchmark runs its targets side by side in the
same run, interleaves repetitions, and reports medians and ratios computed within one
repetition, never a lone absolute number.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float = 15) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def pinned(core: int | None, argv: list[str]) -> list[str]:
    """argv run on one core when taskset exists (it does not everywhere)."""
    if core is None or not shutil.which("taskset"):
        return argv
    return ["taskset", "-c", str(core), *argv]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def need(*tools: str) -> None:
    """Exit with a clear message when a tool the benchmark runs is missing."""
    for tool in tools:
        if not shutil.which(tool):
            package = {"redis-server": "redis-server"}.get(tool, tool)
            raise SystemExit(f"bench needs {tool} (apt-get install -y {package})")


class Procs:
    """Child processes started for one benchmark; all stopped together."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], core: int | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("cwd", ROOT)
        proc = subprocess.Popen(pinned(core, argv), **kw)
        self.procs.append(proc)
        return proc

    def redis(self, port: int, core: int | None = None) -> subprocess.Popen[bytes]:
        argv = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
        return self.spawn(argv, core)

    def proxy(
        self, config: Path, core: int | None = None, tree: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """cacheproxy serving `config`: this checkout's, or the one in `tree` (same venv)."""
        argv = [PYTHON, "-m", "proxy", "serve", "-c", str(config), "--log-level", "warning"]
        if tree is None:
            return self.spawn(argv, core)
        return self.spawn(argv, core, cwd=tree, env=tree_env(tree))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that makes `python -m proxy` import the package in `tree`: run from
    `tree` too, since `-m` puts the working directory first on sys.path."""
    paths = [str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def reference_tree(ref: str) -> tuple[str, Path]:
    """The commit `ref` names and a checkout of its tree in the temp directory, made once per
    commit and reused after.

    `git archive`, not `git worktree add`: a worktree would be registered in the repository
    (shared with whoever else works in it) and outlive a crashed run; a plain copy of a
    commit's tree never changes, so a finished one can be reused as it is.
    """
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if sha.returncode != 0:
        raise SystemExit(f"--against {ref}: not a commit here ({sha.stderr.strip()})")
    commit = sha.stdout.strip()
    tree = Path(tempfile.gettempdir()) / f"cacheproxy-ref-{commit[:12]}"
    if not (tree / ".complete").exists():
        # Extract beside it, then rename: a half-written tree is never found under its name.
        part = Path(tempfile.mkdtemp(prefix=f"{tree.name}-", dir=tree.parent))
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT,
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(part)], input=archive, check=True)
        (part / ".complete").write_text(commit + "\n")
        try:
            part.rename(tree)
        except OSError:  # another run got there first, or a stale unfinished copy sits there
            shutil.rmtree(part)
            if not (tree / ".complete").exists():
                raise SystemExit(f"{tree} exists but is incomplete: remove it") from None
    where = subprocess.run(
        [PYTHON, "-c", "import proxy; print(proxy.__file__)"],
        cwd=tree, env=tree_env(tree), capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not Path(where).is_relative_to(tree):  # the editable install of this checkout won
        raise SystemExit(f"{tree}: python imports proxy from {where} instead")
    return commit, tree


# One worker, files under {dir}; the http block is left open for what follows.
_NGINX_HEAD = """
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
"""

NGINX_CONF = _NGINX_HEAD + """\
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=api:64m max_size=2g inactive=1d
                     use_temp_path=off;
    upstream api {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache api;
            proxy_cache_valid 200 {ttl}s;
            proxy_cache_lock on;
            add_header X-Cache $upstream_cache_status;
            {extra}
        }}
    }}
}}
"""


def nginx(
    procs: Procs,
    directory: Path,
    port: int,
    upstream: int,
    ttl: int = 3600,
    core: int | None = None,
    extra: str = "",
) -> subprocess.Popen[bytes]:
    """nginx with proxy_cache (1 worker, its default key) in front of 127.0.0.1:upstream.

    `ttl` is `proxy_cache_valid 200`; the upstream's own Cache-Control still wins when it sends
    one, as nginx does by default. `extra` adds directives to the location.
    """
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    # As root, nginx drops its worker to nobody, which could not write the cache directory.
    user = "user root;" if os.geteuid() == 0 else ""
    text = NGINX_CONF.format(
        user=user, dir=directory, port=port, upstream=upstream, ttl=ttl, extra=extra
    )
    conf.write_text(text)
    return procs.spawn(["nginx", "-c", str(conf), "-g", "daemon off;"], core,
                       stderr=subprocess.DEVNULL)  # fmt: skip


@contextmanager
def processes() -> Iterator[Procs]:
    """A Procs whose children are stopped however the block ends."""
    procs = Procs()
    try:
        yield procs
    finally:
        procs.stop()


def parse_wrk(output: str) -> dict[str, float]:
    """req/s, request count, p50/p99 in ms and non-2xx count from `wrk --latency` output."""

    def latency(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if not m:
            return float("nan")
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
        return float(m.group(1)) * scale

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    requests = re.search(r"(\d+) requests in", output)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": float(requests.group(1)) if requests else 0.0,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
        # connect, read, write and timeout errors: requests that never got an answer
        "socket_errors": float(sum(int(n) for n in sockets.groups())) if sockets else 0.0,
    }


def clean(name: str, stats: dict[str, float], output: str) -> dict[str, float]:
    """wrk's stats, after making sure every request got a 2xx: fast errors would otherwise
    pass for throughput."""
    if stats["non_2xx"] or stats["socket_errors"]:
        raise SystemExit(
            f"{name}: {stats['non_2xx']:.0f} non-2xx answers and "
            f"{stats['socket_errors']:.0f} socket errors:\n{output}"
        )
    return stats


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def stamp() -> str:
    """The run's date, for result headers."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def write_results(name: str, data: dict[str, Any], markdown: str) -> None:
    """bench/results/<name>.json and <name>.md, and the markdown on stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)


FIXED_CONF = _NGINX_HEAD + """\
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            rewrite "(\\d)$" /body$1 break;
            rewrite ^ /body0 break;
            root {dir}/bodies;
        }}
    }}
}}
"""


def nginx_fixed(
    procs: Procs, directory: Path, port: int, bodies: list[bytes], core: int | None = None
) -> subprocess.Popen[bytes]:
    """nginx (1 worker) answering every GET path with a fixed body: a fast upstream.

    A path ending in digit d gets bodies[d % len(bodies)], so numbered paths cycle through
    the sizes given; any other path gets bodies[0]. Static files, so nginx adds its usual
    headers (Server, Date, Content-Type, Content-Length, Last-Modified, ETag, Accept-Ranges).
    """
    (directory / "bodies").mkdir(parents=True, exist_ok=True)
    for digit in range(10):
        (directory / "bodies" / f"body{digit}").write_bytes(bodies[digit % len(bodies)])
    conf = directory / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(FIXED_CONF.format(user=user, dir=directory, port=port))
    return procs.spawn(["nginx", "-c", str(conf), "-g", "daemon off;"], core,
                       stderr=subprocess.DEVNULL)  # fmt: skip


UNIQUE_LUA = """
-- Every request a new path: <base><prefix><n>, n = 1, 2, ...; stops after `limit` responses
-- when a limit is given.  wrk ... -s unique.lua URL -- <base> <prefix> [limit]
-- One Lua state per wrk thread, so run it with -t1 to keep paths distinct.
local base, prefix, limit = "/", "", -1
local sent, received = 0, 0
function init(args)
   base = args[1] or base
   prefix = args[2] or prefix
   limit = tonumber(args[3] or "-1")
end
function request()
   sent = sent + 1
   return wrk.format("GET", base .. prefix .. sent)
end
function response(status, headers, body)
   received = received + 1
   if limit > 0 and received >= limit then
      wrk.thread:stop()
   end
end
"""


def unique_paths_lua(directory: Path) -> Path:
    """A wrk script making every request's path distinct (see UNIQUE_LUA for its arguments)."""
    path = directory / "unique.lua"
    path.write_text(UNIQUE_LUA)
    return path


def admin_json(port: int, path: str = "/stats") -> Any:
    """GET a proxy admin endpoint on 127.0.0.1 and decode its JSON."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def wrk_until(argv: list[str], done: Callable[[], bool], timeout: float = 600) -> str:
    """Run wrk (argv, already pinned) until done() says so, then stop it with SIGINT and
    return its report. For scripts that stop their own requests (UNIQUE_LUA's limit): wrk
    itself would idle until its -d duration ends."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not done() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    return out
