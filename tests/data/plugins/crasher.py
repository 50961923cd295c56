"""A rule with bugs on demand: raises at RCPT for crash-rcpt@... and at DATA for a Subject holding "crash-data"."""
from smtpgate import Rule


class Crasher(Rule):
    name = "crasher"

    async def on_rcpt(self, tx, rcpt):
        if rcpt.local.lower() == "crash-rcpt":
            raise RuntimeError("kaboom in on_rcpt")
        return None

    async def on_data(self, tx):
        if "crash-data" in (tx.message.get("Subject") or ""):
            raise ZeroDivisionError("kaboom in on_data")
        return None
