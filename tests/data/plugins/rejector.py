"""Rejects every message at DATA as spam: enforced, or only logged in shadow mode."""
from smtpgate import Rule, Verdict


class Rejector(Rule):
    name = "rejector"

    async def on_data(self, tx):
        return Verdict.reject("Message looks like spam", reason="test rejector")
