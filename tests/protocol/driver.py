"""A client session in process: a Conversation and its FakeRelay, driven one command line at a time.

What the front does before calling the conversation (reading lines, the arguments' syntax)
is not repeated here: the tests write well-formed lines, parsed with the gate's own path parser.
"""
from __future__ import annotations

from smtpgate.mail.addresses import parse_path
from smtpgate.mail.session import Session, new_id
from smtpgate.pipeline.policy import Policy, PolicySet
from smtpgate.runtime.gate import Runtime
from smtpgate.smtp import forwarding
from smtpgate.smtp.conversation import Conversation
from smtpgate.smtp.relay import failure
from smtpgate.testing import FakeRelay, Harness

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"
# The downstream is lost (a reset connection) when this recipient is sent to it.
LOST_RECIPIENT = "lost@example.com"
LOST = {f"rcpt:{LOST_RECIPIENT}": failure(ConnectionResetError("reset by peer"))}


class Client:
    def __init__(self, rules=(), *, relay_replies: dict | None = None, capabilities=None,
                 policies: dict[str, list] | None = None, client_ip: str = "192.0.2.1",
                 forwarder: bool = False):
        """``rules``: the ``default`` policy's (governing example.com); ``policies``: more,
        by domain (each its own policy named after it); ``forwarder``: the peer is in
        ``trusted_forwarders`` (XCLIENT/XFORWARD accepted)."""
        self.harness = Harness(rules)
        if policies:
            default = self.harness.runtime.policies.session_policy
            others = [Policy(domain, (domain,), (), [r if not isinstance(r, tuple) else
                                                      r[0](r[1], self.harness.context) for r in rules_],
                             "<test>") for domain, rules_ in policies.items()]
            runtime = Runtime(self.harness.runtime.config, None, PolicySet([default, *others]),
                              self.harness.stores)
            self.harness.runtime = runtime
            self.harness.gate.swap(runtime)
        self.relay = FakeRelay({**LOST, **(relay_replies or {})}, capabilities)
        self.session = Session(new_id(), client_ip)
        self.conv = Conversation(self.harness.gate, self.session, self.relay)
        self.conv.forwarder = forwarder

    @property
    def state(self) -> str:
        return self.conv.state.name

    @property
    def relayed(self):
        return self.relay.relayed

    async def connect(self) -> "Client":
        await self.conv.connect()
        return self

    async def send(self, line: str, message: bytes = MESSAGE) -> str:
        """One command line; the reply as the client would read it (DATA: the final one,
        or the refusal given instead of 354)."""
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb in ("HELO", "EHLO"):
            reply = await self.conv.helo(arg, verb == "EHLO")
        elif verb in ("MAIL", "RCPT"):
            keyword = "FROM:" if verb == "MAIL" else "TO:"
            assert arg[:len(keyword)].upper() == keyword, line
            path = parse_path(arg[len(keyword):].strip(), smtputf8=True)
            command = self.conv.mail if verb == "MAIL" else self.conv.rcpt
            reply = await command(path.address, path.params)
        elif verb == "DATA":
            reply = self.conv.refusal("DATA") or await self.conv.data(message)
        elif verb == "RSET":
            reply = await self.conv.rset()
        elif verb in ("XCLIENT", "XFORWARD"):  # as the front: sequence, syntax, step, rules again
            reply = self.conv.refusal(verb, early=True)
            if reply is None:
                try:
                    forwarded = forwarding.parse(verb, arg)
                except forwarding.ForwardError as e:
                    return str(e.reply)
                step = self.conv.xclient if verb == "XCLIENT" else self.conv.xforward
                reply = await step(forwarded)
                if reply.is_positive:
                    reply = await self.conv.rerun_session_rules() or reply  # a 421: closed
        else:
            raise ValueError(f"not a command the conversation takes: {line}")
        return str(reply)

    async def walk(self, *lines: str) -> list[str]:
        return [await self.send(line) for line in lines]

    async def close(self) -> None:
        await self.conv.close()
        await self.harness.aclose()
