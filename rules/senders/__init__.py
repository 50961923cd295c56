"""senders: a finite state machine per sender, declared in the policy (Lamson's idea at SMTP time).

Each key — the sender address (normalised), its domain, the client address or its network —
is in one state of the machine; the transaction's events (``delivered``, ``rejected``,
``greylisted``, ``dnsbl_listed``, ...) move it along guarded transitions, and quiet keys
decay back. What a state does — skip other rules (greylisting), refuse or defer at MAIL,
RCPT or DATA, add a header, limit the rate — is declared with it. ``senders: {}`` runs the
default machine (``_senders_default.py``): new, probation, trusted, suspect, blocked.

Built on ``smtpgate.MachineRule`` (the same base a plugin author's own machine uses): the
state is loaded at MAIL, the events are applied atomically in the gate's store when the
transaction ends. Written only against the public plugin API. Documentation:
docs/rules/senders.md.
"""
from __future__ import annotations

from smtpgate import MachineRule, Option, Verdict, anything, duration, one_of, prefix_length

from .config import KEY_KINDS_DOC, build, error_path


def machine_name(value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a machine name, got {value!r}")
    return value


class Senders(MachineRule):
    """Per-sender state machines declared in YAML."""

    name = "senders"
    machine = Option(machine_name, "senders", "the machine's name: its keys' namespace in the store "
                                              "(give two different machines different names)")
    key = Option(one_of("sender", "sender_domain", "client_ip", "client_net"), "sender", KEY_KINDS_DOC)
    initial = Option(anything, None, "the state a key starts in (with states:; default new)")
    states = Option(anything, None, "the states: transitions (events), decay (ttl, decay_to) and what each "
                                    "does (skip, reject, tempfail, at, add_header, rate); absent: the "
                                    "default machine")
    forget_after = Option(duration, "90d", "a key without events this long is forgotten (back to the initial state)")
    ipv4_prefix = Option(prefix_length(32), 24, "the IPv4 network a client_net key stands for")
    ipv6_prefix = Option(prefix_length(128), 64, "the IPv6 network a client_net key stands for")

    def setup(self):
        # The `machine` option names the machine; from here on self.machine is the Machine.
        self.machine, self.actions = build(self._options["machine"], self.states, self.initial,
                                           self.forget_after, self.name)
        self.check_machine()
        for state, act in self.actions.items():
            if act.skip or act.rate or (act.refusal and act.refusal.at == "mail"):
                self.add_handler(state, "mail", self._at_mail)
            if act.refusal and act.refusal.at == "rcpt":
                self.add_handler(state, "rcpt", self._at_rcpt)
            if act.add_header or (act.refusal and act.refusal.at == "data"):
                self.add_handler(state, "data", self._at_data)

    def error_key(self, e):
        return error_path(e, self.states)

    def describe_state(self, state: str) -> list[str]:
        """What a key in ``state`` gets, one line per action (for the CLI)."""
        act = self.actions.get(state)
        return act.describe() if act else []

    # -- what states do ------------------------------------------------------------------
    def _fill(self, text: str, sender) -> str:
        return text.format(key=sender.key, state=sender.state, machine=self.machine.name)

    def _refuse(self, sender) -> Verdict:
        r = self.actions[sender.state].refusal
        reason = f"{self.machine.name}: {sender.key} is {sender.state}"
        if r.action == "reject":
            return Verdict.reject(self._fill(r.text, sender), r.code, r.enhanced, reason=reason)
        return Verdict.tempfail(self._fill(r.text, sender), r.code, r.enhanced, reason=reason)

    async def _at_mail(self, tx, sender):
        act = self.actions[sender.state]
        for rule in act.skip:
            tx.skip(rule, f"{self.machine.name}: {sender.key} is {sender.state}")
        if act.refusal and act.refusal.at == "mail":
            return self._refuse(sender)
        if act.rate:
            limit, per = act.rate
            over, seen = await self.hit(sender.key, limit, per)
            if over:
                return Verdict.tempfail(f"Too many messages from {sender.key}, try again later", 451, "4.7.1",
                                        reason=f"{self.machine.name}: {sender.key} is {sender.state}: "
                                               f"over {limit} per {per:g}s")
        return None

    async def _at_rcpt(self, tx, rcpt, sender):
        return self._refuse(sender)

    async def _at_data(self, tx, sender):
        act = self.actions[sender.state]
        if act.refusal and act.refusal.at == "data":
            return self._refuse(sender)
        if act.add_header:
            name, value = act.add_header
            tx.message.prepend_header(name, self._fill(value, sender))
        return None
