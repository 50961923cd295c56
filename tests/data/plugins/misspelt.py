"""A plugin with a misspelt hook (on_rcpt_to): check-config must name it with the file."""
from smtpgate import Rule


class Misspelt(Rule):
    name = "misspelt"

    async def on_rcpt_to(self, tx, rcpt):
        return None
