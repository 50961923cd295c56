"""Refuses every recipient it is asked about (the gate never asks it about postmaster)."""
from smtpgate import Rule, Verdict


class RefuseEveryone(Rule):
    name = "refuse_everyone"

    async def on_rcpt(self, tx, rcpt):
        return Verdict.reject("nobody here")
