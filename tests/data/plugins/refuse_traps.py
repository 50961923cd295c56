"""Refuses recipients whose local part starts with "trap" (550 5.1.1): a rejection a test can cause at will."""
from smtpgate import Rule, Verdict


class RefuseTraps(Rule):
    name = "refuse_traps"

    async def on_rcpt(self, tx, rcpt):
        if rcpt.local.startswith("trap"):
            return Verdict.reject("No such user here", 550, "5.1.1")
        return None
