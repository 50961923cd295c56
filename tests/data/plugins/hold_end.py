"""Holds the end of a transaction whose Subject is "hold" until the test lets it go: its
on_end connects to 127.0.0.1:$HOLD_END_PORT (the test's listener: "the hook started") and
waits for one byte ("released"). For the tests of the work done after the client's reply."""
import asyncio
import os

from smtpgate import Rule


class HoldEnd(Rule):
    name = "hold_end"

    async def on_end(self, tx, reply):
        if tx.message is None or tx.message.get("Subject") != "hold":
            return None
        reader, writer = await asyncio.open_connection("127.0.0.1", int(os.environ["HOLD_END_PORT"]))
        try:
            await reader.read(1)
        finally:
            writer.close()
        return "released"
