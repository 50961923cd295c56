#!/usr/bin/env python3
"""The Python floor: a bare inline SMTP relay (aiosmtpd in, aiosmtplib out), no checks, no rules.
What "written in Python on these libraries" costs on a machine; the gate's empty policy is
measured against it. Each message is relayed to the downstream before the client gets the
downstream's DATA reply (as the gate does).
  floor_relay.py --listen 20040 --down 20025 [--uvloop] [--workers N] [--reuse-down]
--reuse-down: one downstream connection per inbound session (reused across its messages,
otherwise a fresh downstream connection per message). --workers N: N processes, SO_REUSEPORT."""
import argparse, asyncio, os, signal
import aiosmtplib
from aiosmtpd.smtp import SMTP

A = None

async def open_down():
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=A.down, local_hostname="relay.bench.test",
                        start_tls=False, timeout=30)
    await c.connect()
    return c

async def bye(c):
    try:
        await c.quit()
    except Exception:
        c.close()

class Relay:
    async def handle_DATA(self, server, session, env):
        try:
            c = getattr(session, "down", None) if A.reuse_down else None
            if c is None or not c.is_connected:
                c = await open_down()
                if A.reuse_down:
                    session.down = c
            try:
                await c.mail(env.mail_from)
                for r in env.rcpt_tos:
                    await c.rcpt(r)
                resp = await c.data(env.original_content)
            finally:
                if not A.reuse_down:
                    asyncio.ensure_future(bye(c))  # QUIT after we answered the client
            return f"{resp.code} {resp.message}"
        except aiosmtplib.SMTPResponseException as e:
            if A.reuse_down and getattr(session, "down", None):
                session.down.close(); session.down = None
            return f"{e.code} {e.message}"
        except Exception as e:  # downstream unreachable etc.
            session.down = None
            return f"451 4.4.0 relay failed: {type(e).__name__}"

class RelaySMTP(SMTP):
    def connection_lost(self, exc):
        c = getattr(self.session, "down", None) if self.session else None
        if c is not None:
            asyncio.ensure_future(bye(c))
        super().connection_lost(exc)

async def serve():
    # NB: let asyncio create the socket. A hand-made socket.socket(AF_INET, SOCK_STREAM) has proto=0,
    # and stock asyncio then skips TCP_NODELAY on accepted sockets -> 40 ms Nagle/delayed-ACK stall
    # on every multi-line reply (EHLO). uvloop sets TCP_NODELAY regardless.
    h = Relay()
    srv = await asyncio.get_running_loop().create_server(
        lambda: RelaySMTP(h, hostname="gate.bench.test", ident="bench-gate", data_size_limit=50 << 20),
        host="127.0.0.1", port=A.listen, reuse_port=True, backlog=1024)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with srv:
        await stop.wait()

def run_one():
    if A.uvloop:
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            r.run(serve())
    else:
        asyncio.run(serve())

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--listen", type=int, default=20026); p.add_argument("--down", type=int, default=20025)
    p.add_argument("--uvloop", action="store_true"); p.add_argument("--workers", type=int, default=1)
    p.add_argument("--reuse-down", action="store_true")
    A = p.parse_args()
    if A.workers == 1:
        run_one()
    else:
        kids = []
        for _ in range(A.workers):
            pid = os.fork()
            if pid == 0:
                run_one(); os._exit(0)
            kids.append(pid)
        signal.signal(signal.SIGTERM, lambda *_: [os.kill(k, signal.SIGTERM) for k in kids])
        for k in kids:
            while True:
                try:
                    os.waitpid(k, 0); break
                except InterruptedError:
                    continue
