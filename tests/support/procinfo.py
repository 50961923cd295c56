"""What the tests read about child processes from Linux /proc: children, sockets, start times."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [0] state, [1] ppid, ... [19] starttime


def _all_stats() -> dict[int, list[str]]:
    """pid -> its /proc/PID/stat fields, for every process we may look into (one look)."""
    return {int(name): fields for name in os.listdir("/proc")
            if name.isdigit() and (fields := proc_stat(int(name)))}


def children_of(pid: int) -> dict[int, str]:
    """pid -> starttime of every process whose parent is pid."""
    return {child: fields[19] for child, fields in _all_stats().items() if int(fields[1]) == pid}


LISTEN, ESTABLISHED = "0A", "01"  # the kernel's TCP states as /proc/net/tcp writes them


def _tcp_sockets():
    """(local address in hex, local port, state, inode) of every TCP socket, /proc/net/tcp{,6}."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            f = open(table)
        except OSError:  # a kernel without IPv6 has no tcp6
            continue
        with f:
            next(f, None)
            for row in f:
                cols = row.split()
                addr, _, port = cols[1].rpartition(":")
                yield addr, int(port, 16), cols[3], cols[9]


def tcp_inodes(port: int, state: str) -> set[str]:
    """Inodes of the sockets on local ``port`` (any address) in ``state``, from /proc/net/tcp{,6}."""
    return {inode for _, p, st, inode in _tcp_sockets() if st == state and p == port}


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A /proc/net/tcp{,6} address: 32-bit words in hex, each in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def listeners_for(host: str, port: int) -> set[str]:
    """Inodes of the sockets that take connections to host:port: listening on that address
    or on a wildcard (0.0.0.0, ::)."""
    wanted = ipaddress.ip_address(host)
    return {inode for addr, p, st, inode in _tcp_sockets()
            if st == LISTEN and p == port and ((a := _address(addr)) == wanted or a.is_unspecified)}


def listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on port (any address)."""
    return tcp_inodes(port, LISTEN)


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process pid holds open (empty once it is gone)."""
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def family(pid: int) -> list[int]:
    """pid and its descendants (a supervisor and its workers), from one look at /proc."""
    parents = {child: int(fields[1]) for child, fields in _all_stats().items()}
    out = [pid]
    for p in out:
        out += [child for child, parent in parents.items() if parent == p]
    return out


def socket_holders(inode: str) -> list[str]:
    """``PID (command line)`` of each process holding socket inode, of those we may look into."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and inode in socket_inodes(int(name)):
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = "?"
            out.append(f"{name} ({cmd.strip()[:200]})")
    return out
