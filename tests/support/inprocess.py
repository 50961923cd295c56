"""The real front in the test's own event loop: GateSMTP on a loopback listener, relaying to
a downstream, for tests that look inside the gate while real clients talk to it."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from smtpgate.runtime.gate import Gate
from smtpgate.runtime.loading import load_runtime
from smtpgate.server import _tls_context
from smtpgate.smtp.connections import ConnectionTracker
from smtpgate.smtp.front import GateSMTP


@asynccontextmanager
async def start_front(folder: Path, downstream_port: int, rules: str = " []", extra: str = ""):
    """Write gate.yaml and the default policy (example.com; ``rules``: what follows
    ``rules:``) into ``folder``, ``extra`` appended to gate.yaml (a ``tls:`` line offers
    STARTTLS); listen on 127.0.0.1 (a free port), which ``async with`` gives; at its end the
    server is closed, then the stores."""
    (folder / "policies").mkdir()
    (folder / "policies" / "default.yaml").write_text(f"domains: [example.com]\nrules:{rules}\n")
    (folder / "gate.yaml").write_text(
        f"hostname: gate.test\nlisten: ['127.0.0.1:0']\nworkers: 1\n"
        f"downstream: {{host: 127.0.0.1, port: {downstream_port}, pool: {{size: 0}}}}\n"
        f"state: sqlite:///{folder}/state.db\nquarantine: {folder}/quarantine\n"
        f"policies: {folder}/policies\n{extra}")
    runtime = load_runtime(str(folder / "gate.yaml"))
    gate = Gate(runtime)
    gate.draining, gate.tls_context = False, _tls_context(runtime.config)
    tracker = ConnectionTracker()
    server = await asyncio.get_running_loop().create_server(
        lambda: GateSMTP(gate, tracker, gate.tls_context), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await runtime.stores.close()
