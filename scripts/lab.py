#!/usr/bin/env python3
"""A lab of hosts on one machine: Linux network namespaces that reach each other and nothing else.

    python scripts/lab.py check [--hosts 3]   build a lab, prove it is isolated, tear it down (exit 0)
    python scripts/lab.py clean PREFIX        delete the namespaces PREFIX-* of a run that was killed

Layout (../shared/lab-network.md): a switch namespace PREFIX-sw holds a bridge br0; host I (1..N)
is a namespace PREFIX-hI with one veth vI, address 198.18.0.I/24, whose peer pI is a port of br0.
Loopback is up in every host and IPv6 off; no namespace has a default route and none is linked to
the root namespace. From a host the other hosts answer and any other address is "Network is
unreachable" at once. 198.18.0.0/15 is reserved for benchmarking (RFC 2544): no real network uses it.

The root namespace cannot reach the hosts either (by design), so everything that talks to a lab
process - health checks, Kubo's RPC API, Toxiproxy's API - runs inside a host: `Lab.http` starts a
small stdlib Python probe there with `ip netns exec`.

From a test:

    with Lab(hosts=3) as lab:                       # unique prefix, everything deleted on exit
        lab.kubo_network()                          # a private IPFS network, one Kubo per host
        node = lab.start_node(2, "healthcare_authority", via_proxy=True)
        lab.add_latency(2, 100)                     # Toxiproxy in host 2 delays what host 2 sends back
        reply = node.get("/health", from_host=1)    # measured inside host 1
        lab.partition(2); ...; lab.heal(2)

Faults. Every inbound connection to a service started `via_proxy` passes a toxiproxy-server in
its host: the service listens on 127.0.0.1 inside the host and the proxy on the host's lab address
with the same port, so there is no way around it. Toxics therefore act on connections other hosts
open *to* that host. Toxiproxy works on TCP streams, so there is no packet to drop: `add_loss`
resets a fraction of new connections (see its docstring for why that stands in for loss).
"""
from __future__ import annotations

import argparse
import base64
import collections
import errno
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python scripts/lab.py`
    sys.path.insert(0, str(ROOT))

from scripts.cluster import KUBO_SCRIPT, Kubo, NodeProcess, _alive, node_args, write_swarm_key  # noqa: E402

TOXIPROXY_SCRIPT = ROOT / "scripts" / "toxiproxy.sh"
LAB_NETWORK = ipaddress.ip_network("198.18.0.0/15")  # every lab address is in here
SUBNET = ipaddress.ip_network("198.18.0.0/24")  # host I is 198.18.0.I
MAX_HOSTS = 254
# Ports inside a host: each host is its own network namespace, so they never collide.
KUBO_API_PORT, KUBO_GATEWAY_PORT, KUBO_SWARM_PORT = 5001, 8080, 4001
TOXIPROXY_API_PORT = 8474
NODE_PORT = 5000
START_SECONDS = 60
STOP_SECONDS = 10
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
ROUTE_TYPES = {"unicast", "local", "broadcast", "multicast", "anycast", "throw", "unreachable", "prohibit",
               "blackhole", "nat"}
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                   "ALL_PROXY", "NO_PROXY")


class LabError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def namespaces() -> set[str]:
    """Names of every network namespace `ip netns` knows."""
    return {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()}


ORPHAN = re.compile(r"emrlab-(?:probe-|[a-z])?(?P<pid>\d+)-[0-9a-f]{6}(?:-.*)?")


def sweep_orphans() -> list[str]:
    """Delete namespaces left by labs whose process is gone (killed with -9, a lost session).

    Such a lab had no chance to close itself. A namespace counts as orphaned only when its name
    carries the pid of the process that made it and no process has that pid any more; whatever
    still runs inside it is killed first. Returns the names deleted.
    """
    deleted = []
    for name in sorted(namespaces()):
        match = ORPHAN.fullmatch(name)
        if not match or _alive(int(match["pid"])):
            continue
        pids = _ip("netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if _ip("netns", "del", name, check=False).returncode == 0:
            deleted.append(name)
    return deleted


def available() -> tuple[bool, str]:
    """Whether this machine can build a lab; the reason when it cannot."""
    if os.geteuid() != 0:
        return False, "needs root to create network namespaces"
    if not shutil.which("ip"):
        return False, "needs iproute2's `ip`"
    name = f"emrlab-probe-{os.getpid()}-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return False, f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True, ""


def _clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for lab processes: no HTTP proxy settings (nothing may be sent through one)."""
    env = dict(os.environ if env is None else env)
    for name in PROXY_VARIABLES:
        env.pop(name, None)
    return env


# -- the probe: HTTP and TCP from inside a host -----------------------------------------

PROBE = r"""
import base64, json, socket, sys, time, urllib.error, urllib.request
spec = json.loads(sys.argv[1])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy

def once():
    start = time.monotonic()
    if "connect" in spec:
        host, port = spec["connect"]
        sock = socket.socket()
        sock.settimeout(spec["timeout"])
        try:
            sock.connect((host, port))
            return {"status": 0, "elapsed": time.monotonic() - start}
        except OSError as exc:
            return {"status": None, "errno": exc.errno, "error": f"{type(exc).__name__}: {exc}",
                    "elapsed": time.monotonic() - start}
        finally:
            sock.close()
    body = base64.b64decode(spec["body"]) if spec.get("body") is not None else None
    request = urllib.request.Request(spec["url"], data=body, method=spec["method"], headers=spec["headers"])
    try:
        with opener.open(request, timeout=spec["timeout"]) as response:
            status, data = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read()
    except Exception as exc:
        reason = getattr(exc, "reason", exc)
        reason = reason if isinstance(reason, BaseException) else exc
        return {"status": None, "errno": getattr(reason, "errno", None),
                "error": f"{type(reason).__name__}: {reason}", "elapsed": time.monotonic() - start}
    return {"status": status, "body": base64.b64encode(data).decode(), "elapsed": time.monotonic() - start}

replies, deadline = [], time.monotonic() + spec["wait"]
for _ in range(spec["count"]):
    reply = once()
    while spec["wait"] and reply["status"] not in spec["expect"] and time.monotonic() < deadline:
        time.sleep(0.1)
        reply = once()
    replies.append(reply)
print(json.dumps(replies))
"""


@dataclass
class Reply:
    """One HTTP exchange (or TCP connect) made inside a lab host; `elapsed` is timed there."""

    status: int | None
    body: bytes = b""
    elapsed: float = 0.0
    error: str | None = None
    errno: int | None = None

    @property
    def status_code(self) -> int | None:  # like requests.Response
        return self.status

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def __str__(self) -> str:
        if self.status is None:
            return f"no answer after {self.elapsed:.3f}s ({self.error})"
        return f"{self.status} after {self.elapsed:.3f}s: {self.text[:300]}"


# -- the lab ------------------------------------------------------------------------------

class Lab:
    """N hosts as network namespaces on one bridge, isolated from everything else.

    Use as a context manager; `close()` kills every process started in the lab (also ones that
    detached, such as Kubo daemons) and deletes every namespace the lab made, even after a failure.
    """

    def __init__(self, hosts: int = 3, prefix: str | None = None, workdir: Path | str | None = None,
                 keep_files: bool = False) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"a lab has 1 to {MAX_HOSTS} hosts, not {hosts}")
        self.prefix = prefix or f"emrlab-{os.getpid()}-{secrets.token_hex(3)}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,60}", self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: letters, digits, '.', '_' and '-' only")
        self.size = hosts
        self.switch = f"{self.prefix}-sw"
        self.names = {host: f"{self.prefix}-h{host}" for host in self.hosts}
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.keep_files = keep_files
        self._created: list[str] = []
        self._processes: list[tuple[int, subprocess.Popen[Any]]] = []
        self._kubos: dict[int, LabKubo] = {}
        self._toxiproxies: dict[int, subprocess.Popen[Any]] = {}
        self._proxies: dict[int, dict[str, str]] = {}
        self._swarm_key: Path | None = None
        self.swarm_dial_failures: dict[int, int] = {}  # host -> swarm/connect calls that failed (lossy links)
        self.failed = False

    # -- building and tearing down

    @property
    def hosts(self) -> range:
        return range(1, self.size + 1)

    @property
    def namespaces(self) -> list[str]:
        return [self.switch, *self.names.values()]

    def __enter__(self) -> "Lab":
        self.up()
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        self.failed = self.failed or kind is not None
        self.close()

    def up(self) -> "Lab":
        """Create the switch and the hosts; on any failure, undo everything made so far."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in sweep_orphans():
            print(f"lab: deleted {name}, left by a lab whose process is gone", file=sys.stderr)
        try:
            self._add_namespace(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host, name in self.names.items():
                self._add_namespace(name)
                # The veth is made inside the host, its peer inside the switch: neither end ever
                # exists in the root namespace.
                _ip("-n", name, "link", "add", f"v{host}", "type", "veth", "peer", "name", f"p{host}",
                    "netns", self.switch)
                _ip("-n", self.switch, "link", "set", f"p{host}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"p{host}", "up")
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "addr", "add", f"{self.address(host)}/{SUBNET.prefixlen}", "dev", f"v{host}")
                _ip("-n", name, "link", "set", f"v{host}", "up")
            for host in self.hosts:
                self.assert_isolated(host)
            self.assert_wiring()
        except BaseException:
            self.failed = True
            try:
                self.close()
            except LabError as exc:  # keep the first error; say what could not be removed
                print(f"lab: {exc}", file=sys.stderr)
            raise
        return self

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)  # fails if the name exists: never reuse someone else's namespace
        self._created.append(name)
        # No IPv6 at all: nothing to route, not even link-local addresses.
        subprocess.run(["ip", "netns", "exec", name, "sh", "-c",
                        "test -d /proc/sys/net/ipv6 || exit 0; "
                        "echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6; "
                        "echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6"], check=True, timeout=30)

    def close(self) -> None:
        """Kill every process of the lab, delete every namespace it made, check none is left."""
        for _, process in self._processes:  # ours first, politely
            if process.poll() is None:
                process.terminate()
        self._sweep(signal.SIGTERM)  # whatever else runs in a lab host (Kubo daemons)
        deadline = time.monotonic() + STOP_SECONDS
        while (any(p.poll() is None for _, p in self._processes) or self._pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for _, process in self._processes:
            if process.poll() is None:
                process.kill()
            try:
                process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(50):
            if not self._sweep(signal.SIGKILL):
                break
            time.sleep(0.1)
        left_running = self._pids()
        problems = []
        for name in reversed(self._created):  # hosts first, then the switch; their veths go with them
            result = _ip("netns", "del", name, check=False)
            if result.returncode != 0 and name in namespaces():
                problems.append(f"{name}: {result.stderr.strip()}")
        self._created = [name for name in self._created if name in namespaces()]
        self._processes.clear()
        self._toxiproxies.clear()
        if self._own_workdir and self.workdir.exists():
            if self.failed or self.keep_files:
                print(f"lab: files of {self.prefix} kept in {self.workdir}", file=sys.stderr)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        if left_running:
            problems.append(f"processes still running in the lab: {left_running}")
        if self._created or problems:
            raise LabError(f"lab {self.prefix} not fully removed: {'; '.join(problems) or self._created}")

    def _pids(self) -> dict[str, list[int]]:
        found = {}
        for name in self._created:
            result = _ip("netns", "pids", name, check=False)
            pids = [int(pid) for pid in result.stdout.split() if pid.isdigit() and int(pid) != os.getpid()]
            if pids:
                found[name] = pids
        return found

    def _sweep(self, sig: signal.Signals) -> int:
        count = 0
        for pids in self._pids().values():
            for pid in pids:
                try:
                    os.kill(pid, sig)
                    count += 1
                except ProcessLookupError:
                    pass
        return count

    # -- facts and checks

    def address(self, host: int) -> str:
        """The lab address of a host: 198.18.0.HOST."""
        self._check_host(host)
        return str(SUBNET.network_address + host)

    def namespace(self, host: int) -> str:
        self._check_host(host)
        return self.names[host]

    def _check_host(self, host: int) -> None:
        if host not in self.names:
            raise ValueError(f"no host {host} in this lab (hosts 1..{self.size})")

    def routes(self, host: int) -> str:
        return _ip("-n", self.namespace(host), "route").stdout

    def assert_isolated(self, host: int) -> None:
        """The host routes to the lab subnet and nowhere else: no default route in any table, no IPv6."""
        name = self.namespace(host)
        for line in _ip("-n", name, "-4", "route", "show").stdout.splitlines():
            if line.split()[0] != str(SUBNET):
                raise LabError(f"host {host} ({name}) has a route beyond the lab: {line!r}")
        for line in _ip("-n", name, "-4", "route", "show", "table", "all").stdout.splitlines():
            words = line.split()
            destination = words[1] if words[0] in ROUTE_TYPES else words[0]
            if destination == "default" or not any(ipaddress.ip_network(destination).subnet_of(network)
                                                   for network in (SUBNET, LOOPBACK)):
                raise LabError(f"host {host} ({name}) has a route beyond the lab: {line!r}")
        six = _ip("-n", name, "-6", "route", "show", "table", "all").stdout.strip()
        if six:
            raise LabError(f"host {host} ({name}) has IPv6 routes: {six!r}")

    def assert_wiring(self) -> None:
        """Each host has loopback and one veth whose peer is in the switch; the switch has the bridge
        and one port per host whose peer is that host. So no link leads to the root namespace."""
        for host, name in self.names.items():
            links = _links(name)
            if set(links) != {"lo", f"v{host}"} or links[f"v{host}"] != self.switch:
                raise LabError(f"host {host} ({name}) is wired wrong: {links}")
        links = _links(self.switch)
        expected = {"lo", "br0", *(f"p{host}" for host in self.hosts)}
        if set(links) != expected or any(links[f"p{host}"] != self.names[host] for host in self.hosts):
            raise LabError(f"switch {self.switch} is wired wrong: {links}")

    # -- processes in a host

    def command(self, host: int, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host), *map(str, argv)]

    def run(self, host: int, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command to its end inside a host (output captured as text unless told otherwise)."""
        self.assert_isolated(host)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        if kwargs.get("input") is None:
            kwargs.pop("input", None)
            kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs["env"] = _clean_env(kwargs.get("env"))
        return subprocess.run(self.command(host, argv), **kwargs)

    def popen(self, host: int, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside a host; it is killed when the lab closes (or by `stop`)."""
        self.assert_isolated(host)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        kwargs["env"] = _clean_env(kwargs.get("env"))
        process = subprocess.Popen(self.command(host, argv), **kwargs)
        self._processes.append((host, process))
        return process

    @staticmethod
    def stop(process: subprocess.Popen[Any], timeout: float = STOP_SECONDS) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # -- talking to lab processes, from inside the lab

    def http(self, host: int, url: str, method: str = "GET", *, body: bytes | None = None,
             json_body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10.0,
             count: int = 1, wait: float = 0.0, expect: Iterable[int] = (200,)) -> list[Reply]:
        """`count` HTTP requests made from inside `host` (one new connection each), timed there.

        With `wait`, each request is retried every 0.1 s until its status is in `expect` or `wait`
        seconds have passed."""
        headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers.setdefault("Content-Type", "application/json")
        spec = {"url": url, "method": method, "headers": headers, "timeout": timeout, "count": count,
                "wait": wait, "expect": list(expect),
                "body": base64.b64encode(body).decode() if body is not None else None}
        return self._probe(host, spec, timeout * count + wait + 30)

    def get(self, host: int, url: str, **kwargs: Any) -> Reply:
        return self.http(host, url, **kwargs)[0]

    def post(self, host: int, url: str, **kwargs: Any) -> Reply:
        return self.http(host, url, "POST", **kwargs)[0]

    def connect(self, host: int, address: str, port: int, timeout: float = 3.0) -> Reply:
        """Open (and close) a TCP connection from inside a host; status 0 if it connected."""
        return self._probe(host, {"connect": [address, port], "timeout": timeout, "count": 1, "wait": 0,
                                  "expect": [0]}, timeout + 30)[0]

    def _probe(self, host: int, spec: dict[str, Any], limit: float) -> list[Reply]:
        result = self.run(host, [sys.executable, "-I", "-S", "-c", PROBE, json.dumps(spec)], timeout=limit)
        if result.returncode != 0:
            raise LabError(f"probe in host {host} failed: {result.stderr.strip()[-2000:]}")
        return [Reply(item["status"], base64.b64decode(item.get("body") or ""), item["elapsed"],
                      item.get("error"), item.get("errno")) for item in json.loads(result.stdout)]

    def wait_http(self, host: int, url: str, process: subprocess.Popen[Any] | None = None,
                  timeout: float = START_SECONDS, log: Path | None = None) -> Reply:
        """Poll `url` from inside `host` until it answers 200; fail early if `process` exits."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.get(host, url, timeout=2, wait=min(2.0, max(0.0, deadline - time.monotonic())))
            if reply.status == 200:
                return reply
            if process is not None and process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
                raise LabError(f"process for {url} in host {host} exited ({process.returncode}): {tail}")
            if time.monotonic() > deadline:
                raise LabError(f"{url} did not answer in host {host} within {timeout}s: {reply}"
                               + (f" (log: {log})" if log else ""))

    # -- partitions

    def partition(self, host: int) -> None:
        """Cut a host off the switch (its link down): it reaches nothing, nothing reaches it."""
        _ip("-n", self.namespace(host), "link", "set", f"v{host}", "down")

    def heal(self, host: int) -> None:
        """Reconnect a partitioned host; returns once its route to the lab is back."""
        _ip("-n", self.namespace(host), "link", "set", f"v{host}", "up")
        deadline = time.monotonic() + 10
        while str(SUBNET) not in self.routes(host):
            if time.monotonic() > deadline:
                raise LabError(f"host {host}'s route did not come back after heal")
            time.sleep(0.05)

    # -- Kubo: one daemon per host, a private IPFS network over lab addresses

    @property
    def swarm_key(self) -> Path:
        if self._swarm_key is None:
            self._swarm_key = write_swarm_key(self.workdir / "swarm.key")
        return self._swarm_key

    def kubo(self, host: int, *, via_proxy: bool = False) -> "LabKubo":
        """The Kubo of a host: its repo is made (scripts/kubo.sh init, in the host) on first ask, so its
        peer ID is known before it starts. `via_proxy`: the swarm listens on 127.0.0.1 and Toxiproxy on
        the lab address forwards to it; otherwise the swarm listens on the lab address itself."""
        if host not in self._kubos:
            daemon = LabKubo(self.workdir / f"kubo-h{host}", KUBO_API_PORT, KUBO_GATEWAY_PORT, KUBO_SWARM_PORT,
                             swarm_key=self.swarm_key, bind="127.0.0.1" if via_proxy else self.address(host),
                             lab=self, host=host)
            daemon.identity = daemon.init()
            self._kubos[host] = daemon
        daemon = self._kubos[host]
        if via_proxy != (daemon.bind == "127.0.0.1"):
            raise LabError(f"host {host}'s Kubo was made with via_proxy={not via_proxy}")
        return daemon

    def start_kubo(self, host: int, *, peers: Iterable[int] | None = None, via_proxy: bool = False) -> str:
        """Start the Kubo of a host, peered with the Kubo of every other host (or `peers`) at their lab
        addresses, in the lab's private network (one swarm key, LIBP2P_FORCE_PNET=1); returns its API
        URL as seen from inside that host."""
        daemon = self.kubo(host, via_proxy=via_proxy)
        others = [other for other in (self.hosts if peers is None else peers) if other != host]
        for other in others:  # their repos exist, so their peer IDs are known, before any starts
            if other not in self._kubos:
                self.kubo(other, via_proxy=via_proxy)
        daemon.peers = [f"{self._kubos[other].identity}@{self.address(other)}:{KUBO_SWARM_PORT}" for other in others]
        if via_proxy:
            self.proxy(host, "kubo-swarm", KUBO_SWARM_PORT)
        daemon.start()
        daemon.running = True
        for other in others:  # Peering retries with a back-off: connect the ones already up at once
            if self._kubos[other].running:
                self._dial(daemon, other)
        return daemon.api_url

    def _dial(self, daemon: "LabKubo", other: int, attempts: int = 5) -> None:
        """Connect a daemon's swarm to another host's now, again if a lossy link resets the dial; if every
        attempt fails, Peering keeps trying. Failed dials are counted in `swarm_dial_failures`."""
        for attempt in range(attempts):
            try:
                daemon.connect(other)
                return
            except LabError:
                self.swarm_dial_failures[daemon.host] = self.swarm_dial_failures.get(daemon.host, 0) + 1
                time.sleep(0.2 * 2 ** attempt)

    def kubo_network(self, hosts: Iterable[int] | None = None, *, via_proxy: bool = False,
                     timeout: float = 60) -> list["LabKubo"]:
        """A Kubo in each of `hosts` (default all), every one connected to every other."""
        chosen = list(self.hosts if hosts is None else hosts)
        for host in chosen:
            self.kubo(host, via_proxy=via_proxy)
        for host in chosen:
            self.start_kubo(host, peers=chosen, via_proxy=via_proxy)
        daemons = [self._kubos[host] for host in chosen]
        deadline = time.monotonic() + timeout
        while any(len(daemon.swarm_peer_addresses()) < len(chosen) - 1 for daemon in daemons):
            if time.monotonic() > deadline:
                raise LabError("Kubo daemons did not all connect: "
                               + ", ".join(f"h{d.host}: {d.swarm_peer_addresses()}" for d in daemons))
            time.sleep(0.5)
        return daemons

    # -- Toxiproxy: a fault proxy in front of a host's services

    def start_toxiproxy(self, host: int) -> str:
        """Start a toxiproxy-server inside a host, its API on 127.0.0.1 there; returns the API URL."""
        url = f"http://127.0.0.1:{TOXIPROXY_API_PORT}"
        if host in self._toxiproxies and self._toxiproxies[host].poll() is None:
            return url
        binary = _toxiproxy_binary()
        log_path = self.workdir / f"toxiproxy-h{host}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = self.popen(host, [binary, "-host", "127.0.0.1", "-port", str(TOXIPROXY_API_PORT)],
                                 stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LOG_LEVEL": "info"})
        self._toxiproxies[host] = process
        self._proxies.setdefault(host, {})
        self.wait_http(host, f"{url}/version", process, timeout=30, log=log_path)
        return url

    def proxy(self, host: int, name: str, port: int, upstream_port: int | None = None) -> str:
        """A Toxiproxy proxy in a host: listens on HOST_ADDRESS:port, forwards to 127.0.0.1:upstream_port
        (default the same port) inside the host; returns the listen address."""
        api = self.start_toxiproxy(host)
        listen = f"{self.address(host)}:{port}"
        if self._proxies[host].get(name) == listen:
            return listen
        reply = self.post(host, f"{api}/proxies", json_body={
            "name": name, "listen": listen, "upstream": f"127.0.0.1:{upstream_port or port}", "enabled": True})
        if reply.status != 201:
            raise LabError(f"Toxiproxy in host {host} refused proxy {name} on {listen}: {reply}")
        self._proxies[host][name] = listen
        return listen

    def proxies(self, host: int) -> dict[str, str]:
        """name -> listen address of the proxies in a host."""
        return dict(self._proxies.get(host, {}))

    def accepted_connections(self, host: int) -> collections.Counter[str]:
        """Proxy name -> connections the host's Toxiproxy has accepted so far (every connection another host
        opened to it), read from its log (one "Accepted client" line each, at log level info)."""
        counts: collections.Counter[str] = collections.Counter()
        log_path = self.workdir / f"toxiproxy-h{host}.log"
        if host not in self._toxiproxies or not log_path.exists():
            return counts
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("message") == "Accepted client":
                counts[str(entry.get("name"))] += 1
        return counts

    def toxics(self, host: int) -> dict[str, list[dict[str, Any]]]:
        """Proxy name -> the toxics on it now, as the host's Toxiproxy reports them."""
        if host not in self._toxiproxies:
            return {}
        reply = self.get(host, f"http://127.0.0.1:{TOXIPROXY_API_PORT}/proxies")
        if reply.status != 200:
            raise LabError(f"Toxiproxy in host {host} did not list its proxies: {reply}")
        return {name: proxy.get("toxics") or [] for name, proxy in reply.json().items()}

    def add_toxic(self, host: int, kind: str, attributes: dict[str, Any], *, proxy: str | None = None,
                  stream: str = "downstream", toxicity: float = 1.0, name: str | None = None) -> list[str]:
        """Add (or replace) a toxic on one proxy of a host, or on all of them; returns the proxies hit."""
        if stream not in ("upstream", "downstream"):
            raise ValueError("stream is 'upstream' (to the service) or 'downstream' (from it)")
        targets = [proxy] if proxy else list(self._proxies.get(host, {}))
        if not targets:
            raise LabError(f"host {host} has no proxy: start its services with via_proxy=True")
        name = name or f"{kind}_{stream}"
        api = f"http://127.0.0.1:{TOXIPROXY_API_PORT}"
        for target in targets:
            self.http(host, f"{api}/proxies/{target}/toxics/{name}", "DELETE", expect=(204, 404))
            reply = self.post(host, f"{api}/proxies/{target}/toxics", json_body={
                "name": name, "type": kind, "stream": stream, "toxicity": toxicity, "attributes": attributes})
            if reply.status != 200:
                raise LabError(f"Toxiproxy in host {host} refused toxic {name} on {target}: {reply}")
        return targets

    def add_latency(self, host: int, ms: int, jitter: int = 0, *, proxy: str | None = None,
                    stream: str = "downstream") -> list[str]:
        """Delay data through a host's proxies by ms +/- jitter. Downstream (default): what the host sends
        back, so each request to it takes at least `ms` longer; "both" delays each direction by `ms`."""
        streams = ("upstream", "downstream") if stream == "both" else (stream,)
        hit: list[str] = []
        for one in streams:
            hit = self.add_toxic(host, "latency", {"latency": int(ms), "jitter": int(jitter)}, proxy=proxy,
                                 stream=one)
        return hit

    def add_loss(self, host: int, rate: float = 0.05, *, proxy: str | None = None, mode: str = "reset") -> list[str]:
        """Lose a fraction `rate` of the connections other hosts open to this host.

        Toxiproxy relays TCP streams and cannot drop packets; TCP itself would turn a lost packet into
        a retransmission, i.e. delay (which `add_latency` with jitter models). What an application
        sees of a bad link is connections that fail, so that is what this does: Toxiproxy decides for
        each new connection, with probability `rate` (its "toxicity"), whether the toxic applies.
        mode "reset" (default): `reset_peer` with timeout 0 on the upstream: as soon as the client
        sends, the connection is reset (the request never reaches the service; the client sees
        ECONNRESET at once, so tests stay fast). mode "blackhole": `timeout` with timeout 0 on the
        upstream: the request is swallowed and nothing comes back, until the client's own timeout.
        Each connection is decided once: when it opens, or, for one already open when the toxic is added,
        at that moment. So a long-lived connection (Kubo's libp2p connection, HTTP keep-alive) is lost
        with probability `rate` once in its life; to subject every connection to the loss, add it before
        any connection is made (`LabCluster(latency_ms=..., loss=...)` does)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate is a probability, 0..1")
        kinds = {"reset": "reset_peer", "blackhole": "timeout"}
        if mode not in kinds:
            raise ValueError(f"mode is one of {', '.join(kinds)}")
        return self.add_toxic(host, kinds[mode], {"timeout": 0}, proxy=proxy, stream="upstream",
                              toxicity=rate, name="loss")

    def clear_toxics(self, host: int | None = None) -> None:
        """Remove every toxic (and re-enable every proxy) in a host's Toxiproxy, or in every host's."""
        for one in ([host] if host is not None else list(self._toxiproxies)):
            if one in self._toxiproxies:
                reply = self.post(one, f"http://127.0.0.1:{TOXIPROXY_API_PORT}/reset", expect=(204,))
                if reply.status != 204:
                    raise LabError(f"Toxiproxy in host {one} did not reset: {reply}")

    # -- emr-chain nodes

    def start_node(self, host: int, role: str = "patient", *, port: int = NODE_PORT, api_key: str | None = None,
                   via_proxy: bool = False, ipfs_api: str | None = None, peers: Iterable[str] = (),
                   **settings: Any) -> "LabNode":
        """Start `python app.py` inside a host and wait until its /health answers (asked from inside the
        host, at the address other hosts use). The node listens on the host's lab address, or with
        `via_proxy` on 127.0.0.1 behind a Toxiproxy proxy on the lab address (same port). Its IPFS API
        is the host's Kubo (127.0.0.1:5001 inside the host) unless `ipfs_api` says otherwise."""
        address = self.address(host)
        data_dir = self.workdir / f"node-h{host}-{port}"
        settings = {"host": "127.0.0.1" if via_proxy else address, "api_key": api_key or secrets.token_hex(16),
                    "peer_allow": str(LAB_NETWORK), "ipfs_api": ipfs_api or f"http://127.0.0.1:{KUBO_API_PORT}",
                    "data_dir": data_dir, "mining_workers": 1, **settings}
        if via_proxy:
            settings.setdefault("public_url", f"http://{address}:{port}")
        if peers:
            settings["peers"] = ",".join(peers)
        node = LabNode(port, node_args(role, **settings), self.workdir / f"node-h{host}-{port}.log",
                       lab=self, host=host, public=address, api_key=settings["api_key"])
        if via_proxy:
            self.proxy(host, f"node-{port}", port)
        return node.start()


def _links(namespace: str) -> dict[str, str]:
    """Link name -> the namespace its peer is in ("" if none) inside a namespace."""
    links = {}
    for line in _ip("-n", namespace, "-o", "link", "show").stdout.splitlines():
        match = re.match(r"\d+: ([^:@]+)(?:@[^:]+)?: .*", line)
        if match:
            peer = re.search(r" link-netns (\S+)", line) or re.search(r" link-netnsid (\S+)", line)
            links[match.group(1)] = peer.group(1) if peer else ""
    return links


def _toxiproxy_binary() -> str:
    result = subprocess.run([str(TOXIPROXY_SCRIPT), "bin"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise LabError(f"Toxiproxy is not installed: run scripts/toxiproxy.sh install ({result.stderr.strip()})")
    return result.stdout.strip()


@dataclass
class LabKubo(Kubo):
    """A Kubo daemon inside a lab host: scripts/kubo.sh, the CLI and the RPC API all run in the host."""

    lab: Lab | None = field(default=None, repr=False)
    host: int = 0
    identity: str = ""
    running: bool = False

    def script(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.lab is not None
        return self.lab.run(self.host, [str(KUBO_SCRIPT), *args], env=self.env(), timeout=120, check=check)

    def ipfs(self, *args: str, input: bytes | None = None, text: bool = True) -> Any:  # noqa: A002
        assert self.lab is not None
        binary = self.script("bin").stdout.strip()
        return self.lab.run(self.host, [binary, *args], env=self.env(), input=input, text=text, timeout=60,
                            check=True).stdout

    def rpc(self, command: str, **params: str) -> Any:
        assert self.lab is not None
        url = f"{self.api_url}/api/v0/{command}" + (f"?{urlencode(params)}" if params else "")
        reply = self.lab.post(self.host, url, timeout=30)
        if reply.status != 200:
            raise LabError(f"Kubo in host {self.host}: {command}: {reply}")
        return reply.json()

    def connect(self, other: int) -> None:
        """Connect the swarm to another host's Kubo now, at its lab address."""
        assert self.lab is not None
        peer = self.lab._kubos[other]
        self.rpc("swarm/connect", arg=f"/ip4/{self.lab.address(other)}/tcp/{KUBO_SWARM_PORT}/p2p/{peer.identity}")

    def ping(self, other: int, count: int = 3) -> list[float]:
        """Round trips (seconds) of libp2p pings to another host's Kubo over the swarm connection."""
        assert self.lab is not None
        # A multiaddress, not the bare peer ID: with routing "none" Kubo cannot look a peer up.
        peer = f"/ip4/{self.lab.address(other)}/tcp/{KUBO_SWARM_PORT}/p2p/{self.lab._kubos[other].identity}"
        reply = self.lab.post(self.host, f"{self.api_url}/api/v0/ping?{urlencode({'arg': peer, 'count': count})}",
                              timeout=30)
        if reply.status != 200:
            raise LabError(f"Kubo in host {self.host}: ping {peer}: {reply}")
        answers = [json.loads(line) for line in reply.text.splitlines() if line.strip()]
        if not all(answer.get("Success") for answer in answers):
            raise LabError(f"Kubo in host {self.host}: ping {peer}: {answers}")
        times = [answer["Time"] / 1e9 for answer in answers if answer.get("Time")]
        if not times:
            raise LabError(f"Kubo in host {self.host}: ping {peer} measured nothing: {answers}")
        return times

    def is_pinned(self, cid: str) -> bool:
        """Whether the daemon holds `cid` under a recursive pin (what `pin/add` makes)."""
        assert self.lab is not None
        reply = self.lab.post(self.host, f"{self.api_url}/api/v0/pin/ls?{urlencode({'arg': cid, 'type': 'recursive'})}",
                              timeout=30, expect=(200, 500))
        return reply.status == 200 and cid in (reply.json().get("Keys") or {})

    def local_bytes(self, cid: str) -> bytes | None:
        """The file `cid` read from this daemon's own blocks only (offline), or None if it lacks any."""
        assert self.lab is not None
        reply = self.lab.post(self.host, f"{self.api_url}/api/v0/cat?{urlencode({'arg': cid, 'offline': 'true'})}",
                              timeout=30, expect=(200, 500))
        return reply.body if reply.status == 200 else None

    def collect_garbage(self) -> None:
        """`ipfs repo gc`: delete every block no pin holds."""
        self.ipfs("repo", "gc", "--quiet")

    def stop(self) -> None:
        super().stop()
        self.running = False


@dataclass
class LabNode(NodeProcess):
    """A `python app.py` process inside a lab host; get/post run inside the lab and return Reply."""

    lab: Lab | None = field(default=None, repr=False)
    host: int = 0
    public: str = ""  # the lab address other hosts use
    api_key: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.public}:{self.port}"

    @property
    def netloc(self) -> str:
        return f"{self.public}:{self.port}"

    def start(self) -> "LabNode":
        assert self.lab is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = self.lab.popen(self.host, [sys.executable, str(ROOT / "app.py"), "--port", str(self.port),
                                                      *self.args], env=self.env, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            self.lab.wait_http(self.host, f"{self.url}/health", self.process, log=self.log_path)
        except BaseException:
            self.stop(kill=True)
            raise
        return self

    def get(self, path: str, *, from_host: int | None = None, **kwargs: Any) -> Reply:  # type: ignore[override]
        assert self.lab is not None
        headers = {"X-API-Key": self.api_key, **kwargs.pop("headers", {})}
        return self.lab.get(from_host or self.host, self.url + path, headers=headers, **kwargs)

    def post(self, path: str, body: Any = None, *, from_host: int | None = None,  # type: ignore[override]
             **kwargs: Any) -> Reply:
        assert self.lab is not None
        headers = {"X-API-Key": self.api_key, **kwargs.pop("headers", {})}
        return self.lab.post(from_host or self.host, self.url + path, json_body=body, headers=headers, **kwargs)


# -- the command line ------------------------------------------------------------------------

def check(hosts: int = 3) -> None:
    """Build a lab, prove it reaches itself and nothing else, tear it down, prove nothing is left."""
    with Lab(hosts=hosts) as lab:
        print(f"lab {lab.prefix}: switch {lab.switch}, hosts "
              + ", ".join(f"{lab.names[h]}={lab.address(h)}" for h in lab.hosts))
        lab.assert_wiring()
        for host in lab.hosts:
            lab.assert_isolated(host)
            print(f"  h{host} routes: {lab.routes(host).strip()}")
        served = lab.workdir / "www"
        served.mkdir()
        (served / "hello.txt").write_text("hello from the lab\n")
        server_host = min(2, hosts)
        server = lab.popen(server_host, [sys.executable, "-m", "http.server", "8000", "--bind",
                                         lab.address(server_host), "--directory", str(served)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://{lab.address(server_host)}:8000/hello.txt"
        lab.wait_http(server_host, url, server, timeout=30)
        for host in lab.hosts:
            reply = lab.get(host, url)
            if reply.body != b"hello from the lab\n":
                raise LabError(f"h{host} could not fetch {url}: {reply}")
            print(f"  h{host} -> {url}: {reply.status} in {reply.elapsed * 1000:.1f} ms")
            # TEST-NET-1: never a real host; with no route the kernel refuses before sending anything.
            outside = lab.connect(host, "192.0.2.1", 80)
            if outside.errno != errno.ENETUNREACH or outside.elapsed > 1.0:
                raise LabError(f"h{host} reached beyond the lab, or did not fail at once: {outside}")
            print(f"  h{host} -> 192.0.2.1:80: {outside.error} in {outside.elapsed * 1000:.1f} ms")
        if hosts >= 2:
            client = 1 if server_host != 1 else 2
            lab.partition(server_host)
            cut = lab.get(client, url, timeout=2)
            if cut.status is not None:
                raise LabError(f"h{client} reached partitioned h{server_host}: {cut}")
            lab.heal(server_host)
            healed = lab.get(client, url, timeout=2, wait=10)
            if healed.status != 200:
                raise LabError(f"h{client} did not reach h{server_host} after heal: {healed}")
            print(f"  partition h{server_host}: h{client} gets {cut.error}; healed: {healed.status}")
        names = lab.namespaces
    left = set(names) & namespaces()
    if left:
        raise LabError(f"namespaces left after teardown: {sorted(left)}")
    print(f"lab check: ok ({len(names)} namespaces made and deleted)")


def clean(prefix: str) -> list[str]:
    """Delete the namespaces PREFIX-sw and PREFIX-hN left by a run that was killed, and their processes."""
    names = sorted(name for name in namespaces() if re.fullmatch(re.escape(prefix) + r"-(sw|h\d+)", name))
    lab = Lab(hosts=1, prefix=prefix, workdir=tempfile.gettempdir())
    lab._own_workdir = False
    lab._created = sorted(names, key=lambda name: name.endswith("-sw"))  # closed in reverse: hosts first
    lab.close()
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_check = sub.add_parser("check", help="build a lab, prove it is isolated, tear it down")
    run_check.add_argument("--hosts", type=int, default=3)
    run_clean = sub.add_parser("clean", help="delete the namespaces PREFIX-sw and PREFIX-hN of a killed run")
    run_clean.add_argument("prefix")
    args = parser.parse_args(argv)
    ok, reason = available()
    if not ok:
        print(f"lab: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` and `with` still tear down
    if args.command == "clean":
        print("deleted: " + (", ".join(clean(args.prefix)) or "nothing"))
        return 0
    check(args.hosts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
