"""A private, throw-away Postfix instance as the gate's downstream, for integration tests.

Debian's ``postfix`` package provides the binaries; the system instance is never written,
never started, and its configuration is not used (the only thing read from /etc/postfix is
``dynamicmaps.cf``, Postfix's list of map-type plug-ins in the default ``meta_directory``).
What this module creates lives in the test's tmp folder, except the data_directory::

    FOLDER/etc/{main.cf,master.cf,recipient_access,client_access}   config_directory
    FOLDER/queue/                                                   queue_directory
    FOLDER/postfix.log                                              maillog_file (postlogd)
    FOLDER/master.out                                               master's stdout/stderr
    /tmp/smtpgate-postfix-XXXX/data/                                data_directory, removed at stop

The instance listens with smtpd on ``127.0.0.1:<free port>`` (XCLIENT and XFORWARD allowed
from 127.0.0.0/8), accepts mail for ``example.com`` only, rejects ``nobody@example.com`` at
RCPT with ``550 5.1.1 User unknown``, logs an ``info: RCPT from ...`` record (client, helo,
sender, recipient) for every recipient it accepts, and relays everything it accepts to
``relayhost = [127.0.0.1]:<relay_port>``.

It runs Postfix's ``master`` directly in the foreground (``master -c FOLDER/etc -d``), as
its own session/process group, so the PID we hold is master's own: stopping it is SIGTERM to
that PID (master stops its children), then SIGKILL to any process still left in its process
group. ``postfix start-fg`` is not used: it forks ``master -s`` from a shell script, so the
PID we would hold would not be master's, and its integrity checks want root-owned parents
and the system's ``meta_directory``.

The data_directory is elsewhere because master opens ``master.lock`` there as ``mail_owner``,
so each of its parents must be searchable by user postfix, and pytest's tmp folders are 0700.
Config files are dated a minute back: Postfix re-reads a file younger than a second until it
is a second old, which would cost ~2 s per start. Start-up then takes ~50 ms, so every test
gets its own instance.

Postfix must run as root here (master starts as root, its daemons drop to ``mail_owner``);
the ``postfix`` user and the ``postdrop`` group come with Debian's package (its postinst
creates them even with debconf's "No configuration").
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.constants import LOOPBACK, START_TIMEOUT, STOP_TIMEOUT
from tests.support.gateproc import free_port, in_ci, require_tool, stop_pid
from tests.support.waiting import wait_until

DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"
START_ATTEMPTS = 3
REJECTED_RECIPIENT = "nobody@example.com"
REJECT_TEXT = "550 5.1.1 User unknown"
MYHOSTNAME = "postfix.test"

# master.cf: nothing chrooted (the tmp folder has no chroot set-up), only what relaying needs.
# service type private unpriv chroot wakeup maxproc command
MASTER_CF = """\
{listen} inet  n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp -o syslog_name=postfix-test/$service_name
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {queue}
data_directory = {data}
daemon_directory = {daemon_directory}
maillog_file = {log}
maillog_file_prefixes = {folder}
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C
syslog_name = postfix-test

myhostname = {myhostname}
mydomain = test
myorigin = $myhostname
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
alias_maps =
alias_database =
local_recipient_maps =
biff = no

relay_domains = example.com
relayhost = [127.0.0.1]:{relay_port}

smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_authorized_xforward_hosts = 127.0.0.0/8
smtpd_relay_restrictions =
smtpd_recipient_restrictions =
    check_recipient_access texthash:{etc}/recipient_access,
    reject_unauth_destination,
    check_client_access cidr:{etc}/client_access
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 100
smtpd_hard_error_limit = 200
smtpd_peername_lookup = no
# log client=NAME[ADDR]:PORT, so the XCLIENT-forwarded client port shows in the log
smtpd_client_port_logging = yes
# Postfix as vulnerable to bare-LF smuggling as it can be made: the gate must protect it
smtpd_forbid_bare_newline = no

# deliver at once, never keep anything waiting for a retry in a test
smtp_dns_support_level = disabled
smtp_connection_cache_on_demand = no
smtp_connect_timeout = 5s
smtp_helo_timeout = 10s
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
in_flow_delay = 0
# a remote client as far as headers go: no From/Date/Message-Id added to its messages
local_header_rewrite_clients =
notify_classes =
"""


class PostfixProcess:
    """One running private Postfix ``master`` and its folder."""

    def __init__(self, proc: subprocess.Popen, folder: Path, port: int, relay_port: int,
                 scratch: Path) -> None:
        self.proc = proc
        self.scratch = scratch          # holds data_directory (see start_postfix)
        self.folder = folder
        self.config_directory = folder / "etc"
        self.queue_directory = folder / "queue"
        self.log_path = folder / "postfix.log"
        self.out_path = folder / "master.out"
        self.host = LOOPBACK
        self.port = port                # where smtpd listens
        self.relay_port = relay_port    # relayhost = [127.0.0.1]:relay_port
        self.relay = None               # the CapturingDownstream there (set by the fixture)
        self._exit: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # -- the log
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_size(self) -> int:
        """The log's current length in characters: pass as ``start`` to look at what came later."""
        return len(self.log_text())

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match:
        """Wait until the regular expression `pattern` matches a log line after `start`."""
        rx = re.compile(pattern, re.M)
        return wait_until(lambda: rx.search(self.log_text()[start:]), timeout,
                          what=lambda: f"postfix log to match {pattern!r}\n{self.describe(start)}")

    def queue_ids(self, start: int = 0) -> list[str]:
        """Queue ids smtpd assigned (its `QUEUEID: client=...` lines), after `start`."""
        return re.findall(r"postfix-test/smtpd\[\d+\]: ([0-9A-F]+): client=", self.log_text()[start:])

    def describe(self, start: int = 0) -> str:
        out = self.out_path.read_text(errors="replace") if self.out_path.exists() else ""
        return (f"--- postfix master pid {self.pid}, folder {self.folder} ---\n"
                f"--- postfix.log (from {start}) ---\n{self.log_text()[start:][-8000:]}"
                f"--- master stdout/stderr ---\n{out[-4000:]}")

    # -- stopping
    def is_running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM to master by PID (it stops its children), then SIGKILL whatever of its
        process group is left. Idempotent; returns master's exit status."""
        if self._exit is None:
            self._exit = stop_pid(self.proc, signal.SIGTERM, timeout)
            _reap_group(self.proc.pid, timeout)
            shutil.rmtree(self.scratch, ignore_errors=True)  # ours, created by mkdtemp
        return self._exit


def _listens(pid: int, port: int) -> bool:
    """True when process `pid` itself holds a socket listening on TCP `port` (per /proc).

    Not just "something listens on the port": if another process took the port between
    free_port() and master's bind, master exits, and that other listener must not count."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f, None)
                for row in f:
                    cols = row.split()
                    if (len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes
                            and int(cols[1].rsplit(":", 1)[1], 16) == port):
                        return True
        except OSError:
            continue
    return False


def _group_members(pgid: int) -> list[int]:
    """PIDs (other than zombies) whose process group is `pgid`, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            pids.append(int(entry))
    return pids


def _reap_group(pgid: int, timeout: float) -> None:
    """Make sure no process of master's group (its children) outlives it."""
    if wait_until(lambda: not _group_members(pgid), timeout):
        return
    for pid in _group_members(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: not _group_members(pgid), timeout)


def _mkdir(path: Path, owner: str, group: str | None, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    uid = pwd.getpwnam(owner).pw_uid
    gid = grp.getgrnam(group).gr_gid if group else pwd.getpwnam(owner).pw_gid
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def write_postfix_folder(folder: Path, *, port: int, relay_port: int, data: Path,
                         smtpd_options: tuple[str, ...] = ()) -> None:
    """Write config_directory and queue_directory into folder, and the data_directory.
    ``smtpd_options`` (``name=value``, no spaces; ``{etc}`` is the config_directory) are
    given to the smtpd service as master.cf ``-o`` overrides of main.cf."""
    folder.mkdir(parents=True, exist_ok=True)
    etc, queue = folder / "etc", folder / "queue"
    etc.mkdir(exist_ok=True)
    os.chmod(folder, 0o755)
    os.chmod(etc, 0o755)
    overrides = "".join(f" -o {o.replace('{etc}', str(etc))}" for o in smtpd_options)
    (etc / "master.cf").write_text(MASTER_CF.format(listen=f"{LOOPBACK}:{port}")
                                   .replace(" smtpd\n", f" smtpd{overrides}\n", 1))
    (etc / "main.cf").write_text(MAIN_CF.format(
        etc=etc, queue=queue, data=data, folder=folder, log=folder / "postfix.log",
        daemon_directory=DAEMON_DIRECTORY, myhostname=MYHOSTNAME, relay_port=relay_port))
    (etc / "recipient_access").write_text(f"{REJECTED_RECIPIENT} {REJECT_TEXT}\n")
    (etc / "client_access").write_text("0.0.0.0/0 INFO postfix-test accepted recipient\n")
    # The queue layout Postfix's postfix-files describes (owner, group, mode).
    _mkdir(queue, "root", "root", 0o755)
    _mkdir(queue / "pid", "root", "root", 0o755)
    for name in ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold",
                 "incoming", "private", "saved", "trace"):
        _mkdir(queue / name, "postfix", None, 0o700)
    _mkdir(queue / "maildrop", "postfix", "postdrop", 0o730)
    _mkdir(queue / "public", "postfix", "postdrop", 0o710)
    _mkdir(data, "postfix", None, 0o700)
    # Postfix re-reads a config file modified within the last second until it is a second
    # old (dict_load_file: guards against half-written files): date them back instead.
    past = time.time() - 60
    for path in etc.iterdir():
        os.utime(path, (past, past))


def start_postfix(folder: Path, *, relay_port: int, start_timeout: float = START_TIMEOUT,
                  smtpd_options: tuple[str, ...] = ()) -> PostfixProcess:
    """Write the instance into folder, start its master, wait until smtpd's port listens."""
    require_tool("postfix")
    master = os.path.join(DAEMON_DIRECTORY, "master")
    if not os.access(master, os.X_OK):
        pytest.fail(f"{master} is missing although the postfix command exists", pytrace=False)
    if os.geteuid() != 0:
        msg = "a private Postfix instance needs root (master starts as root, daemons drop to postfix)"
        if in_ci():
            pytest.fail(msg + " [CI=true: a missing prerequisite is a failure]", pytrace=False)
        pytest.skip(msg)
    # master opens data_directory/master.lock as mail_owner, so every parent of the
    # data_directory must be searchable by user postfix; pytest's tmp folders are 0700.
    scratch = Path(tempfile.mkdtemp(prefix="smtpgate-postfix-"))
    os.chmod(scratch, 0o711)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MAIL_CONFIG": str(folder / "etc"), "LANG": "C"}
    rc_seen = None
    for _attempt in range(START_ATTEMPTS):
        # A fresh port per attempt: another process may take a free port before master
        # binds it, and master then exits 1 without a word (no postlogd yet, no syslog).
        port = free_port()
        write_postfix_folder(folder, port=port, relay_port=relay_port, data=scratch / "data",
                             smtpd_options=smtpd_options)
        with open(folder / "master.out", "ab") as out:
            # -d: stay in the foreground, keep stdout/stderr; own session, so master leads
            # the process group its children inherit (stop() relies on it).
            proc = subprocess.Popen([master, "-c", str(folder / "etc"), "-d"], cwd=folder, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        pf = PostfixProcess(proc, folder, port, relay_port, scratch)
        if not wait_until(lambda: proc.poll() is not None or _listens(proc.pid, port), start_timeout, 0.05):
            pf.stop()
            pytest.fail(f"postfix master did not listen on {LOOPBACK}:{port} within "
                        f"{start_timeout}s\n{pf.describe()}", pytrace=False)
        if proc.poll() is None:
            return pf
        rc_seen = proc.returncode
        _reap_group(proc.pid, STOP_TIMEOUT)
    shutil.rmtree(scratch, ignore_errors=True)
    pytest.fail(f"postfix master exited with {rc_seen} before listening, {START_ATTEMPTS} times "
                f"(it says nothing when it cannot bind its port or use its folders)\n{pf.describe()}",
                pytrace=False)


@pytest.fixture
def postfix_downstream(tmp_path: Path, downstream_factory) -> Iterator[PostfixProcess]:
    """A private Postfix on 127.0.0.1:`.port` whose relayhost is a fresh CapturingDownstream
    (`.relay`, from `downstream_factory()`), so a test sees what Postfix delivered.

    Start-up takes well under a second, so every test gets its own instance (own queue, own
    log). Stopped by PID at teardown; its log is printed (shown when a test fails).
    """
    relay = downstream_factory()
    pf = start_postfix(tmp_path / "postfix", relay_port=relay.port)
    pf.relay = relay
    yield pf
    code = pf.stop()
    print(f"--- postfix master pid {pf.pid} exited {code}; {pf.log_path} ---\n{pf.log_text()[-6000:]}")
