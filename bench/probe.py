#!/usr/bin/env python3
"""Is the system on 127.0.0.1:PORT ready, and does it relay? One message as the benchmark
sends them (sender@bench.test -> rcpt@bench.test), retried while the port refuses or drops
the connection (a system still starting), until the deadline.

    probe.py PORT [--timeout 30]

Exit 0 once a message is accepted with 250; 1 with the reply otherwise (a 451 from an
unexpected greylist, a 550 from a wrong domain: the benchmark would only measure failures).
"""
import argparse
import smtplib
import sys
import time

MESSAGE = (b"From: <sender@bench.test>\r\nTo: <rcpt@bench.test>\r\nSubject: bench probe\r\n"
           b"\r\nprobe\r\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args()
    deadline = time.monotonic() + a.timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with smtplib.SMTP("127.0.0.1", a.port, local_hostname="client.bench.test", timeout=10) as s:
                s.sendmail("sender@bench.test", ["rcpt@bench.test"], MESSAGE)
            return 0
        except (ConnectionError, smtplib.SMTPServerDisconnected, TimeoutError) as e:
            last = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
        except smtplib.SMTPException as e:
            print(f"probe 127.0.0.1:{a.port}: the benchmark message is not accepted: {e}", file=sys.stderr)
            return 1
    print(f"probe 127.0.0.1:{a.port}: not ready after {a.timeout:.0f}s ({last})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
