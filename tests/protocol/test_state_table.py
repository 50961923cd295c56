"""Every state x command pair of the conversation's table, driven in process (RFC 5321 §4.1.4).

The expectations are written out here, not read back from ``TABLE``: a change to the table
must change this file too. A test checks the two cover the same pairs.
"""
from __future__ import annotations

import pathlib

import pytest

from smtpgate.smtp.conversation import COMMANDS, TABLE, State, describe

from .driver import LOST_RECIPIENT, Client

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent

# How a client reaches each state (LOST_RECIPIENT: the downstream resets the connection).
REACH = {
    "GREET": [],
    "READY": ["EHLO client.example"],
    "MAIL": ["EHLO client.example", "MAIL FROM:<a@sender.example>"],
    "RCPT": ["EHLO client.example", "MAIL FROM:<a@sender.example>", "RCPT TO:<user@example.com>"],
    "MAIL_LOST": ["EHLO client.example", "MAIL FROM:<a@sender.example>", f"RCPT TO:<{LOST_RECIPIENT}>"],
    "RCPT_LOST": ["EHLO client.example", "MAIL FROM:<a@sender.example>", "RCPT TO:<user@example.com>",
                  f"RCPT TO:<{LOST_RECIPIENT}>"],
}
LINES = {"HELO": "HELO client.example", "EHLO": "EHLO client.example",
         "MAIL": "MAIL FROM:<b@sender.example>", "RCPT": "RCPT TO:<other@example.com>",
         "DATA": "DATA", "RSET": "RSET",
         "XCLIENT": "XCLIENT ADDR=192.0.2.9 NAME=[UNAVAILABLE]", "XFORWARD": "XFORWARD ADDR=192.0.2.9"}

NEED_HELO = "503 5.5.1 Error: send HELO first"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
NESTED = "503 5.5.1 Error: nested MAIL command"
BROKEN = "451 4.4.2 Transaction aborted after a downstream failure, try again later"
QUEUED = "250 2.0.0 Ok: queued"
IN_TX = "503 5.5.1 Error: MAIL transaction in progress"

# state        command  the reply starts with      next state   messages relayed
CASES = [
    ("GREET",     "HELO", "250 localhost",          "READY",     0),
    ("GREET",     "EHLO", "250-localhost",          "READY",     0),
    ("GREET",     "MAIL", NEED_HELO,                "GREET",     0),
    ("GREET",     "RCPT", NEED_HELO,                "GREET",     0),
    ("GREET",     "DATA", NEED_HELO,                "GREET",     0),
    ("GREET",     "RSET", "250 2.0.0 Ok",           "GREET",     0),
    ("READY",     "HELO", "250 localhost",          "READY",     0),
    ("READY",     "EHLO", "250-localhost",          "READY",     0),
    ("READY",     "MAIL", "250 2.1.0 Ok",           "MAIL",      0),
    ("READY",     "RCPT", NEED_MAIL,                "READY",     0),
    ("READY",     "DATA", NEED_MAIL,                "READY",     0),
    ("READY",     "RSET", "250 2.0.0 Ok",           "READY",     0),
    ("MAIL",      "HELO", "250 localhost",          "READY",     0),  # HELO ends the transaction
    ("MAIL",      "EHLO", "250-localhost",          "READY",     0),
    ("MAIL",      "MAIL", NESTED,                   "MAIL",      0),
    ("MAIL",      "RCPT", "250 2.1.5 Ok",           "RCPT",      0),
    ("MAIL",      "DATA", NEED_RCPT,                "MAIL",      0),
    ("MAIL",      "RSET", "250 2.0.0 Ok",           "READY",     0),
    ("RCPT",      "HELO", "250 localhost",          "READY",     0),
    ("RCPT",      "EHLO", "250-localhost",          "READY",     0),
    ("RCPT",      "MAIL", NESTED,                   "RCPT",      0),
    ("RCPT",      "RCPT", "250 2.1.5 Ok",           "RCPT",      0),
    ("RCPT",      "DATA", QUEUED,                   "READY",     1),
    ("RCPT",      "RSET", "250 2.0.0 Ok",           "READY",     0),
    ("MAIL_LOST", "HELO", "250 localhost",          "READY",     0),
    ("MAIL_LOST", "EHLO", "250-localhost",          "READY",     0),
    ("MAIL_LOST", "MAIL", NESTED,                   "MAIL_LOST", 0),
    ("MAIL_LOST", "RCPT", BROKEN,                   "MAIL_LOST", 0),
    ("MAIL_LOST", "DATA", NEED_RCPT,                "MAIL_LOST", 0),
    ("MAIL_LOST", "RSET", "250 2.0.0 Ok",           "READY",     0),
    ("RCPT_LOST", "HELO", "250 localhost",          "READY",     0),
    ("RCPT_LOST", "EHLO", "250-localhost",          "READY",     0),
    ("RCPT_LOST", "MAIL", NESTED,                   "RCPT_LOST", 0),
    ("RCPT_LOST", "RCPT", BROKEN,                   "RCPT_LOST", 0),
    ("RCPT_LOST", "DATA", BROKEN,                   "READY",     0),  # the message is read, then dropped
    ("RCPT_LOST", "RSET", "250 2.0.0 Ok",           "READY",     0),
    # XCLIENT/XFORWARD from a trusted forwarder (anyone else: 550 5.7.0 in every state)
    ("GREET",     "XCLIENT",  "220 localhost",      "GREET",     0),
    ("GREET",     "XFORWARD", "250 2.0.0 Ok",       "GREET",     0),
    ("READY",     "XCLIENT",  "220 localhost",      "GREET",     0),  # a new session: greet again
    ("READY",     "XFORWARD", "250 2.0.0 Ok",       "READY",     0),
    ("MAIL",      "XCLIENT",  IN_TX,                "MAIL",      0),
    ("MAIL",      "XFORWARD", IN_TX,                "MAIL",      0),
    ("RCPT",      "XCLIENT",  IN_TX,                "RCPT",      0),
    ("RCPT",      "XFORWARD", IN_TX,                "RCPT",      0),
    ("MAIL_LOST", "XCLIENT",  IN_TX,                "MAIL_LOST", 0),
    ("MAIL_LOST", "XFORWARD", IN_TX,                "MAIL_LOST", 0),
    ("RCPT_LOST", "XCLIENT",  IN_TX,                "RCPT_LOST", 0),
    ("RCPT_LOST", "XFORWARD", IN_TX,                "RCPT_LOST", 0),
]
# Refused before the command's arguments are read (the others once their syntax is checked).
EARLY = {("GREET", "MAIL"), ("GREET", "RCPT"), ("GREET", "DATA"), ("READY", "RCPT")} | {
    (state, command) for state in ("MAIL", "RCPT", "MAIL_LOST", "RCPT_LOST")
    for command in ("XCLIENT", "XFORWARD")}


def test_the_cases_cover_the_table():
    assert sorted((s, c) for s, c, *_ in CASES) == sorted((s.name, c) for s in State for c in COMMANDS)
    assert set(TABLE) == set(State) and all(tuple(row) == COMMANDS for row in TABLE.values())


@pytest.mark.parametrize("state,command,reply,after,relayed", CASES,
                         ids=[f"{s}-{c}" for s, c, *_ in CASES])
async def test_state_x_command(state, command, reply, after, relayed):
    client = await Client(forwarder=True).connect()
    for line in REACH[state]:
        await client.send(line)
    assert client.state == state
    early = client.conv.refusal(command, early=True)
    assert (str(early) if early else None) == (reply if (state, command) in EARLY else None)
    assert (await client.send(LINES[command])).startswith(reply)
    assert client.state == after
    assert len(client.relayed) == relayed
    if after in ("GREET", "READY"):  # no transaction left open downstream either
        assert client.conv.tx is None and not client.relay.in_transaction
    await client.close()


def test_the_table_is_documented():
    """docs/behaviour.md shows the table as the code has it (``describe()``)."""
    doc = (ROOT / "docs" / "behaviour.md").read_text()
    assert describe() in doc, "paste smtpgate.smtp.conversation.describe() into docs/behaviour.md"
