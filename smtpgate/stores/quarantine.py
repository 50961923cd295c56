"""Held messages in a Maildir: the original bytes, plus a JSON sidecar with envelope and trace.

Layout under ``quarantine:`` (a Maildir any mail reader opens, plus one folder of our own)::

    tmp/ID            being written
    new/ID            held (the original bytes, exactly as received)
    cur/ID:2,PS       released (Maildir flags P "passed on" and S "seen")
    meta/ID.json      envelope, client, verdict, trace, releases (written atomically)
    meta/ID.lock      taken (flock) while a command releases or deletes ID

Held messages hold other people's mail: files are created ``0600`` (or the configured
``quarantine_mode``, 0640 / 0660 for a group of admins) whatever the umask, the folders
``0700`` (0750 / 0770). ``put`` blocks on fsync: the gate calls it in a thread. ``purge``
enforces the retention (``quarantine_keep``) by the held file's modification time.

Safe with several worker processes and commands at once: a message appears in ``new/`` by
rename only after its sidecar is complete, sidecars are replaced by rename, and release and
delete hold an exclusive ``flock`` on the message's lock file (never waited for: a second
command on the same message is told it is busy).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from dataclasses import asdict

from ..errors import StoreError

_ID = re.compile(r"^[A-Za-z0-9._\\-]{1,200}\Z")
RELEASED_INFO = ":2,PS"


class Busy(StoreError):
    """Another command holds this message's lock."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_mode(file_mode: int) -> int:
    """The folders' mode for a file mode: the same read-write bits, plus x where there is r."""
    return file_mode | ((file_mode & 0o444) >> 2)


class MaildirQuarantine:
    def __init__(self, folder: str, clock=None, mode: int = 0o600):
        self.folder = folder
        self.clock = clock
        self.mode = mode
        self._made = False

    def _now(self) -> float:
        return self.clock.now() if self.clock is not None else time.time()

    def _ensure(self) -> None:
        if not self._made:
            dmode = folder_mode(self.mode)
            if not os.path.isdir(self.folder):
                os.makedirs(self.folder, dmode, exist_ok=True)
                os.chmod(self.folder, dmode)  # makedirs' mode is cut by the umask
            for sub in ("tmp", "new", "cur", "meta"):
                path = os.path.join(self.folder, sub)
                os.makedirs(path, dmode, exist_ok=True)
                with contextlib.suppress(PermissionError):  # ours: tighten an older, wider one
                    os.chmod(path, dmode)
            self._made = True

    def _create(self, path: str):
        """A new file opened for writing with exactly our mode (umask or not)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.mode)
        try:
            os.fchmod(fd, self.mode)
            return os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise

    def _sub(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    # --- storing (the gate) --------------------------------------------------------------
    def put(self, tx, raw: bytes, verdict) -> str:
        """Store one message; returns its id (the Maildir file name)."""
        try:
            self._ensure()
            host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
            name = f"{int(self._now())}.{tx.id}.{host}"
            tmp = self._sub("tmp", name)
            with self._create(tmp) as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            meta = {
                "id": name, "tx": tx.id, "client_ip": tx.session.client_ip,
                "client_port": tx.session.client_port,
                "client_name": tx.session.client_name, "helo": tx.session.helo,
                "esmtp": tx.session.esmtp, "proto": tx.session.proto, "tls": tx.session.tls,
                "sender": tx.sender, "sender_params": tx.sender_params,
                "recipients": [r.address for r in tx.recipients if not r.discard],
                "policy": getattr(tx.policy, "name", None), "reason": verdict.reason,
                "verdict": {"action": verdict.action, "code": verdict.code,
                            "enhanced": verdict.enhanced, "text": verdict.text},
                "delivered": bool((verdict.data or {}).get("delivered")),
                "size": len(raw), "stored": self._now(),
                "trace": [asdict(e) for e in tx.trace], "releases": [],
            }
            self._write_meta(name, meta)
            os.rename(tmp, self._sub("new", name))
            # The client is told its message is held: the new names must survive a crash too.
            _fsync_dir(self._sub("meta"))
            _fsync_dir(self._sub("new"))
            return name
        except OSError as e:
            raise StoreError(f"quarantine {self.folder}: {e}") from e

    # --- reading (the commands) ------------------------------------------------------------
    def _files(self) -> dict[str, tuple[str, str]]:
        """id -> (subfolder, file name) for every message in new/ and cur/."""
        out: dict[str, tuple[str, str]] = {}
        for sub in ("new", "cur"):
            try:
                names = os.listdir(self._sub(sub))
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StoreError(f"quarantine {self.folder}: {e}") from e
            for filename in names:
                if not filename.startswith("."):
                    out[filename.split(":", 1)[0]] = (sub, filename)
        return out

    def list(self) -> list[dict]:
        """Every message's sidecar (plus ``status`` and ``file``), oldest first."""
        found = []
        for qid, (sub, filename) in self._files().items():
            meta = self._read_meta(qid, missing_ok=True) or {"id": qid, "stored": None}
            meta["status"] = "released" if sub == "cur" else "held"
            meta["file"] = self._sub(sub, filename)
            found.append(meta)
        return sorted(found, key=lambda m: (m.get("stored") or 0, m["id"]))

    def find(self, ref: str) -> str:
        """An id from an id, a transaction id (as the log's ``tx=``) or a unique id prefix."""
        files = self._files()
        if ref in files:
            return ref
        if not ref or not _ID.match(ref):
            raise KeyError(f"no held message {ref!r}")
        hits = [q for q in files if q.split(".")[1:2] == [ref]] or \
               [q for q in files if q.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise KeyError(f"no held message {ref!r}")
        raise KeyError(f"{ref!r} names {len(hits)} messages: {', '.join(sorted(hits)[:5])}")

    def path(self, qid: str) -> str:
        files = self._files()
        if qid not in files:
            raise KeyError(f"no held message {qid!r}")
        return self._sub(*files[qid])

    def get(self, qid: str) -> tuple[dict, bytes]:
        files = self._files()
        if qid not in files:
            raise KeyError(f"no held message {qid!r}")
        path = self._sub(*files[qid])
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise KeyError(f"no held message {qid!r}") from None
        except OSError as e:
            raise StoreError(f"quarantine {self.folder}: {e}") from e
        meta = self._read_meta(qid, missing_ok=True) or {"id": qid}
        meta["status"] = "released" if files[qid][0] == "cur" else "held"
        meta["file"] = path
        return meta, raw

    # --- changing (the commands) ------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, qid: str):
        """Exclusive hold on one message for a release or delete; StoreError if taken."""
        if not _ID.match(qid):
            raise KeyError(f"no held message {qid!r}")
        self._ensure()
        path = self._sub("meta", qid + ".lock")
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, self.mode)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy(f"message {qid} is busy (another command is releasing or "
                                 "deleting it)") from None
            yield
        finally:
            os.close(fd)

    def delete(self, qid: str) -> None:
        """Remove a message and its sidecar (the gate calls this too, for a copy it kept for a
        delivery that then failed)."""
        try:
            path = self.path(qid)
        except KeyError:
            return
        try:
            os.unlink(path)
            for suffix in (".json", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._sub("meta", qid + suffix))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"quarantine {self.folder}: {e}") from e

    def purge(self, older_than: float, dry_run: bool = False) -> list[str]:
        """Delete every message (held or released) whose file is older than ``older_than``
        seconds, with its sidecar; returns their ids. A message a command holds right now is
        left for next time. Also clears files left in tmp/ as long ago (a crash mid-write)."""
        cutoff = self._now() - older_than
        gone = []
        for qid, (sub, filename) in sorted(self._files().items()):
            try:
                if os.stat(self._sub(sub, filename)).st_mtime >= cutoff:
                    continue
                if dry_run:
                    gone.append(qid)
                    continue
                with self.lock(qid):
                    self.delete(qid)
                gone.append(qid)
            except (FileNotFoundError, KeyError, Busy):
                continue  # deleted or released meanwhile, or being released: next time
            except OSError as e:
                raise StoreError(f"quarantine {self.folder}: {e}") from e
        if not dry_run:
            try:
                self._purge_tmp(cutoff)
            except OSError as e:
                raise StoreError(f"quarantine {self.folder}: {e}") from e
        return gone

    def _purge_tmp(self, cutoff: float) -> None:
        try:
            names = os.listdir(self._sub("tmp"))
        except FileNotFoundError:
            return
        for name in names:
            path = self._sub("tmp", name)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)

    def record_release(self, qid: str, attempt: dict) -> None:
        """Add one release attempt to the sidecar; a successful one moves the message to cur/."""
        meta = self._read_meta(qid, missing_ok=True) or {"id": qid}
        meta.setdefault("releases", []).append(attempt)
        try:
            self._write_meta(qid, meta)
            if attempt.get("ok"):
                src = self.path(qid)
                dst = self._sub("cur", qid + RELEASED_INFO)
                if src != dst:
                    os.rename(src, dst)
        except OSError as e:
            raise StoreError(f"quarantine {self.folder}: {e}") from e

    # --- sidecars --------------------------------------------------------------------------
    def _write_meta(self, qid: str, meta: dict) -> None:
        final = self._sub("meta", qid + ".json")
        tmp = self._sub("tmp", f".{qid}.json.{os.getpid()}")
        with self._create(tmp) as f:
            f.write(json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def _read_meta(self, qid: str, missing_ok: bool = False) -> dict | None:
        try:
            with open(self._sub("meta", qid + ".json"), encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise KeyError(f"no held message {qid!r}") from None
        except (OSError, ValueError) as e:
            if missing_ok:
                return None
            raise StoreError(f"quarantine {self.folder}: sidecar of {qid}: {e}") from e
