"""The relay is an interface: the real downstream and the public fake both implement ``Relay``,
and aiosmtplib's failures become the client's reply in one place (``relay.failure``)."""
from __future__ import annotations

import asyncio
import inspect

import pytest
from aiosmtplib import SMTPServerDisconnected

from smtpgate.config import load_gate_config
from smtpgate.errors import RelayError
from smtpgate.mail.reply import Reply
from smtpgate.smtp.relay import Downstream, failure
from smtpgate.smtp.relay_api import Capabilities, Relay
from smtpgate.testing import FakeRelay


def downstream() -> Downstream:
    cfg = load_gate_config(None)
    return Downstream(cfg.downstream, cfg.hostname)


def protocol_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(Relay).items()
            if inspect.isfunction(member) and not name.startswith("_")}


@pytest.mark.parametrize("make", [FakeRelay, downstream], ids=["FakeRelay", "Downstream"])
def test_implements_the_relay_protocol(make):
    relay = make()
    assert isinstance(relay, Relay)
    assert relay.connected is False and isinstance(relay.capabilities, Capabilities)
    methods = protocol_methods()
    assert set(methods) == {"open", "mail", "rcpt", "mail_rcpt", "data", "reset", "close"}
    for name, wanted in methods.items():
        method = getattr(relay, name)
        assert inspect.iscoroutinefunction(method), name
        got = inspect.signature(method)
        want = list(wanted.parameters.values())[1:]  # without self
        have = list(got.parameters.values())
        assert [(p.name, p.kind) for p in have] == [(p.name, p.kind) for p in want], name
        # a default where the protocol has one: the conversation may leave the argument out
        assert [p.default is not p.empty for p in have] == [p.default is not p.empty for p in want], name


def test_a_non_relay_is_told_apart():
    class Half:
        async def open(self, session): ...
    assert not isinstance(Half(), Relay)


@pytest.mark.parametrize("problem,opening,reply", [
    (ConnectionRefusedError(111, "refused"), True, "451 4.4.1 Downstream server unavailable, try again later"),
    (asyncio.TimeoutError(), True, "451 4.4.1 Downstream server unavailable, try again later"),
    (SMTPServerDisconnected("gone"), False, "451 4.4.2 Downstream connection failed, try again later"),
    (ConnectionResetError(104, "reset"), False, "451 4.4.2 Downstream connection failed, try again later"),
    (asyncio.TimeoutError(), False, "451 4.4.2 Downstream connection failed, try again later"),
    (Reply(421, "closing", "4.3.2"), False, "451 4.4.2 Downstream connection failed, try again later"),
])
def test_failures_become_451(problem, opening, reply):
    error = failure(problem, opening)
    assert isinstance(error, RelayError) and str(error.reply) == reply


@pytest.mark.parametrize("text", ["250 2.1.5 Ok", "550 5.1.1 no such user", "451 4.7.1 greylisted",
                                  "452 4.5.3 too many"])
def test_other_replies_are_no_failure(text):
    assert failure(Reply.parse(text)) is None


def test_the_conversation_knows_only_the_interface():
    """It is given its relay: it neither imports the real one nor asks the gate for one."""
    import ast
    import smtpgate.smtp.conversation as conversation
    source = inspect.getsource(conversation)
    imported = {node.module for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom) and node.module}
    assert "relay_api" in imported and "relay" not in imported
    assert "new_relay" not in source
