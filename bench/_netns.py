"""Two network hosts on one machine: a pair of network namespaces joined by a veth pair,
each end's outgoing traffic shaped by a tbf qdisc (bench/bench_compress.py uses it).

    with shaped_link("100mbit") as link:
        for rank in (0, 1):
            Popen(link.exec_prefix(rank) + ["env", f"GLOO_SOCKET_IFNAME={link.ifnames[rank]}",
                                            f"MASTER_ADDR={link.addrs[0]}", ...])

tc shapes only what a device sends, so both ends get the same tbf: each direction of the
link is then limited to the rate. Needs root (``ip netns add``, ``ip link add``, ``tc``);
:func:`unavailable` says why it cannot run here, or None. Everything is named after the
process that made it (``ascb<pid>...``), so :func:`shaped_link` can delete what a crashed
earlier run left behind without touching a run still going in another process.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["Link", "cleanup_stale", "parse_rate", "shaped_link", "unavailable"]

PREFIX = "ascb"
SUBNET = "10.213.7"  # inside the namespaces only; the host's routes never see it


@dataclass(frozen=True)
class Link:
    """A live shaped link: rank r runs in ``namespaces[r]``, bound to ``ifnames[r]``."""

    rate: str
    namespaces: tuple[str, str]
    ifnames: tuple[str, str]
    addrs: tuple[str, str]

    def exec_prefix(self, rank: int) -> list[str]:
        """The argv prefix that runs a command inside rank ``rank``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[rank]]


def parse_rate(rate: str) -> float:
    """Bits per second of a tc rate such as '100mbit', '1gbit', '500kbit'."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit", rate.strip().lower())
    if match is None:
        raise ValueError(f"rate {rate!r} is not a tc rate; write e.g. '100mbit' or '1gbit'.")
    scale = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)]
    return float(match.group(1)) * scale


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (no ``ip``/``tc``, not root, refused), or None.

    Probes by making and deleting a namespace, which is the one check that answers for
    containers that are root but lack CAP_NET_ADMIN.
    """
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2)"
    if os.geteuid() != 0:
        return "not root (ip netns add needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    probe = f"{PREFIX}{os.getpid()}probe"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(name: str) -> bool:
    match = re.match(rf"{PREFIX}(\d+)", name)
    return match is not None and not _pid_alive(int(match.group(1)))


def cleanup_stale() -> list[str]:
    """Delete namespaces and root-namespace veths left by runs whose process is gone.

    Returns the names deleted. Deleting a namespace destroys the veth end inside it, and
    with it the peer; a veth still in the root namespace (a run that died between
    ``ip link add`` and moving it) is deleted by name.
    """
    deleted = []
    listing = _run(["ip", "netns", "list"], check=False).stdout
    for name in (line.split()[0] for line in listing.splitlines() if line.strip()):
        if _stale(name):
            _run(["ip", "netns", "del", name], check=False)
            deleted.append(name)
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for match in re.finditer(rf"^\d+:\s+({PREFIX}\d+[ab])[@:]", links, re.MULTILINE):
        if _stale(match.group(1)):
            _run(["ip", "link", "del", match.group(1)], check=False)
            deleted.append(match.group(1))
    return deleted


def _tbf_args(rate: str, queue_ms: float) -> list[str]:
    # Note: [tbf burst and queue]
    # burst is the bucket: ~1 ms of traffic at the rate, at least 32 KiB (a few GSO
    # segments), so the link bursts little above its rate. latency bounds the queue, in ms
    # of traffic at the rate; at 100 Mbit/s neither 100 ms nor 10 ms dropped a packet
    # (tc -s: dropped 0, no TCP retransmits) and both gave the same step times.
    bytes_per_s = parse_rate(rate) / 8
    burst = max(32 * 1024, int(bytes_per_s / 1000))
    return ["tbf", "rate", rate, "burst", str(burst), "latency", f"{queue_ms:g}ms"]


def _create(link: Link, queue_ms: float) -> None:
    for ns in link.namespaces:
        _run(["ip", "netns", "add", ns])
    _run(["ip", "link", "add", link.ifnames[0], "type", "veth", "peer", "name",
          link.ifnames[1]])
    for rank, (ns, ifname) in enumerate(zip(link.namespaces, link.ifnames, strict=True)):
        _run(["ip", "link", "set", ifname, "netns", ns])
        _run(["ip", "-n", ns, "addr", "add", f"{link.addrs[rank]}/24", "dev", ifname])
        _run(["ip", "-n", ns, "link", "set", ifname, "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ifname, "root",
              *_tbf_args(link.rate, queue_ms)])


def _destroy(link: Link) -> None:
    for ns in link.namespaces:
        _run(["ip", "netns", "del", ns], check=False)
    for ifname in link.ifnames:  # only if it never reached its namespace
        _run(["ip", "link", "del", ifname], check=False)


@contextlib.contextmanager
def shaped_link(rate: str, *, queue_ms: float = 100.0, tag: str = "") -> Iterator[Link]:
    """Two namespaces joined by a veth, both ends shaped to ``rate``; deleted on exit.

    Stale namespaces from dead runs are deleted first (:func:`cleanup_stale`). ``tag``
    (a few letters or digits) tells apart several links made by one process at once;
    ``queue_ms`` is tbf's ``latency``, the queue's length in ms of traffic at ``rate``.
    Raises ``subprocess.CalledProcessError`` (with the command's stderr) when a step fails;
    whatever was made by then is deleted.
    """
    parse_rate(rate)  # refuse a bad rate before making anything
    cleanup_stale()
    base = f"{PREFIX}{os.getpid()}{tag}"
    link = Link(rate=rate, namespaces=(f"{base}-0", f"{base}-1"),
                ifnames=(f"{base}a", f"{base}b"),
                addrs=(f"{SUBNET}.1", f"{SUBNET}.2"))
    if max(len(name) for name in link.ifnames) > 15:
        raise ValueError(f"tag {tag!r} makes interface names longer than Linux's 15 "
                         "characters; use a shorter tag.")
    try:
        _create(link, queue_ms)
        yield link
    finally:
        _destroy(link)
