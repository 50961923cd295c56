"""What the tests read about child processes from Linux /proc: children, sockets, start times."""
from __future__ import annotations

import os
from pathlib import Path


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [0] state, [1] ppid, ... [19] starttime


def children_of(pid: int) -> dict[int, str]:
    """pid -> starttime of every process whose parent is pid."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = proc_stat(int(name))
            if fields and int(fields[1]) == pid:
                out[int(name)] = fields[19]
    return out


LISTEN, ESTABLISHED = "0A", "01"  # the kernel's TCP states as /proc/net/tcp writes them


def tcp_inodes(port: int, state: str) -> set[str]:
    """Inodes of the sockets on local ``port`` (any address) in ``state``, from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for row in f:
                cols = row.split()
                if cols[3] == state and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    return inodes


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
