"""Shows what the rules see: the authserv-ids of the Authentication-Results fields, in an X-Seen-AR header."""
from smtpgate import Rule


class SeenAuthResults(Rule):
    name = "seen_authres"

    async def on_data(self, tx):
        ids = [v.split(";")[0].strip() for v in tx.message.get_all("Authentication-Results")]
        tx.message.prepend_header("X-Seen-AR", ",".join(ids) or "none")
        return None
