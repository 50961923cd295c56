"""arc: verify an incoming ARC chain at DATA, seal the final message at the seal stage (RFC 8617).

At DATA the chain as received is validated — whatever other rules later change — with
dkimpy over keys fetched first through the gate's asynchronous resolver (``chain.py``), and
reported as the ``arc`` method of the gate's Authentication-Results header (``cv`` none,
pass or fail). At the seal stage, after every rule's ``on_data`` and after the gate wrote
that header, a new ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results) is
staged over the message as it will be relayed: the ARC-Authentication-Results carries the
gate's own results, so the next hop can trust them for a message the gate changed. A failed
chain is sealed on with ``cv=fail``; a chain an earlier hop already sealed with ``cv=fail``
is not sealed again (RFC 8617 §5.1.1: it has ended).
"""
from __future__ import annotations

import asyncio
import re

from smtpgate import (DnsError, Message, Option, OptionError, Rule, Verdict, integer, list_of, one_of,
                      size, string)
from smtpgate_rules.dkim.verify import key_record
from . import chain


_INSTANCE = re.compile(r"(?:^|;)\s*i\s*=\s*(\d+)")


def _hostname(value: str) -> str:
    value = str(value).strip().rstrip(".").lower()
    if not chain.DOMAIN_NAME.match(value):
        raise ValueError(f"expected a domain name, got {value!r}")
    return value


def _authserv(value: str) -> str:
    return _hostname(value) if value else ""


def _signed_header(value: str) -> str:
    name = str(value).strip().lower()
    if not name or any(c in name for c in ": \t\r\n") or not name.isascii():
        raise ValueError(f"expected a header field name, got {value!r}")
    if name in chain.NEVER_SIGNED:
        raise ValueError(f"{name} must not be signed (it changes on the way)")
    return name


class Arc(Rule):
    """Validate the incoming ARC chain; seal what the gate relays."""

    name = "arc"
    key = Option(string, doc="the private key's PEM file: RSA (PKCS#1 or PKCS#8), 2048 bits advised")
    selector = Option(_hostname, doc="the key's selector (its TXT record: SELECTOR._domainkey.DOMAIN)")
    domain = Option(_hostname, doc="the sealing domain (d=)")
    headers = Option(list_of(_signed_header), [], "header fields the ARC-Message-Signature signs "
                                                  "(must include from); default: dkimpy's RFC 6376 list "
                                                  "of those present, From twice")
    authserv_id = Option(_authserv, "", "the authserv-id of the ARC-Authentication-Results; "
                                        "default: the gate's (gate.yaml authserv_id, else its hostname)")
    on_dns_error = Option(one_of("accept", "tempfail"), "accept",
                          "a chain's key lookup failed: the chain fails (accept), or 451 4.7.29")
    max_sets = Option(integer, 10, "a chain of more ARC sets fails unchecked (each set costs a body "
                                   "hash and two key operations; RFC 8617 allows 50)")
    thread_above = Option(size, "256k", "messages larger than this are verified and sealed in a worker thread")

    def setup(self):
        try:
            with open(self.key, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise OptionError("key", f"cannot read {self.key}: {e.strerror}") from None
        try:
            self._pem = chain.check_private_key(pem)
        except chain.KeyProblem as e:
            raise OptionError("key", f"{self.key}: {e}") from None
        if self.headers and "from" not in self.headers:
            raise OptionError("headers", "must include from (RFC 6376 §5.4)")
        if not 1 <= self.max_sets <= 50:
            raise OptionError("max_sets", f"expected 1 to 50 (RFC 8617's instance range), got {self.max_sets}")

    # --- DATA: the incoming chain ------------------------------------------------------
    async def on_data(self, tx, message):
        resolver = self.gate.resolver
        if resolver is None:
            raise RuntimeError("arc needs the gate's resolver")
        raw = message.received  # the chain as it arrived, whatever rules before us changed
        big = len(raw) > self.thread_above
        sets = chain.count_sets(raw)
        if sets > self.max_sets:  # not worth checking: refuse the cost, not the message
            self._report(tx, chain.Chain("fail", sets, f"{sets} ARC sets, more than max_sets {self.max_sets}"))
            return None
        names = chain.key_names(raw)
        if len(names) > 2 * self.max_sets:  # each set names at most two keys (AS and AMS)
            self._report(tx, chain.Chain("fail", sets, f"{len(names)} ARC signing keys named, more than "
                                                       f"two per set of max_sets {self.max_sets}"))
            return None
        answers = await resolver.for_session(tx.session).resolve_many(names, "TXT")
        failed = next((f"{n}: {a.kind}" for n, a in answers.items() if isinstance(a, DnsError)), None)
        keys = {n: None if isinstance(a, DnsError) else key_record(a) for n, a in answers.items()}
        if failed and self.on_dns_error == "tempfail":
            tx.results.add(self, err=f"key lookup failed: {failed}")
            return Verdict.tempfail("ARC key lookup failed, try again later", 451, "4.7.29",
                                    reason=f"arc: key lookup failed: {failed}")
        found = await asyncio.to_thread(chain.verify_chain, raw, keys) if big else chain.verify_chain(raw, keys)
        if failed and found.cv == "fail":
            found.reason = f"key lookup failed: {failed}"
        self._report(tx, found)
        return None

    def _report(self, tx, found: chain.Chain) -> None:
        text = f"cv={found.cv}" + (f" ({found.instances} sets)" if found.instances else "")
        kind = {"pass": "pass_", "fail": "fail"}.get(found.cv, "skip")
        tx.results.add(self, **{kind: text + (f": {found.reason}" if found.reason else "")},
                       data={"chain": found.as_dict()})
        tx.results.auth(self, "arc", found.cv, reason=found.reason,
                        header_oldest_pass=str(found.oldest_pass) if found.cv == "pass" else None,
                        smtp_remote_ip=tx.session.client_ip)

    # --- seal: the final message -------------------------------------------------------
    async def on_seal(self, tx, seal, message):
        ours = tx.authentication_results
        record = tx.results.get(self)
        if ours is None or record is None or "chain" not in record.data:
            # without our own results there is nothing to vouch for: no set, and it says why
            tx.results.add(self, err="not sealed: no arc result of this transaction in the gate's "
                                     "Authentication-Results")
            return None
        if record.data["chain"]["ended"]:
            tx.results.add(self, msg="not sealed: an earlier hop ended the chain with cv=fail")
            return None
        gate_id, _, results = ours.partition(";")
        authserv_id = self.authserv_id or gate_id.split()[0]
        raw = _with_results(message, authserv_id, results)
        args = (raw, self._pem, self.domain, self.selector, authserv_id, self.headers or None,
                int(self.clock.now()))
        try:
            fields = await asyncio.to_thread(chain.seal, *args) if len(raw) > self.thread_above \
                else chain.seal(*args)
        except chain.SealFailed as e:  # the message itself is unsealable: relayed as it is
            tx.results.add(self, err=f"not sealed: {e}")
            return None
        if not fields:  # a chain to extend but no arc result of ours: in shadow mode, ours is left out
            tx.results.add(self, err="not sealed: the gate's Authentication-Results has no arc result")
            return None
        for name, value in fields:
            seal.prepend(name, value)
        instance = _INSTANCE.search(fields[0][1])
        tx.results.add(self, msg=f"sealed i={instance.group(1) if instance else '?'} "
                                 f"cv={record.data['chain']['cv']} d={self.domain} s={self.selector}",
                       data={"sealed": True})
        return None


def _with_results(message, authserv_id: str, results: str) -> bytes:
    """The message dkimpy seals: its Authentication-Results fields replaced by one carrying
    the gate's results under ``authserv_id``. dkimpy takes the ARC-Authentication-Results
    from such fields only (none of them is signed), so the set fits the message as relayed;
    and a client's field claiming ``authserv_id`` can never slip into the seal."""
    copy = Message(message.raw)
    copy.remove_header("Authentication-Results")
    copy.prepend_header("Authentication-Results", f"{authserv_id};{results}")
    return copy.raw
