"""Held messages in a Maildir: the original bytes, plus a JSON sidecar with envelope and trace.

Maildir's tmp-then-rename delivery makes it safe with several worker processes at once."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict

from .errors import StoreError


class MaildirQuarantine:
    def __init__(self, folder: str):
        self.folder = folder
        self._made = False

    def _ensure(self) -> None:
        if not self._made:
            for sub in ("tmp", "new", "cur", "meta"):
                os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
            self._made = True

    def put(self, tx, raw: bytes, verdict) -> str:
        """Store one message; returns its id (the Maildir file name)."""
        try:
            self._ensure()
            name = f"{int(time.time())}.{tx.id}.{socket.gethostname()}"
            tmp = os.path.join(self.folder, "tmp", name)
            with open(tmp, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            meta = {
                "id": name, "tx": tx.id, "client_ip": tx.session.client_ip,
                "client_name": tx.session.client_name, "helo": tx.session.helo,
                "sender": tx.sender, "sender_params": tx.sender_params,
                "recipients": [r.address for r in tx.recipients if not r.discard],
                "policy": getattr(tx.policy, "name", None), "reason": verdict.reason,
                "stored": time.time(), "trace": [asdict(e) for e in tx.trace],
            }
            with open(os.path.join(self.folder, "meta", name + ".json"), "w") as f:
                json.dump(meta, f)
            os.rename(tmp, os.path.join(self.folder, "new", name))
            return name
        except OSError as e:
            raise StoreError(f"quarantine {self.folder}: {e}") from e
