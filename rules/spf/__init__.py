"""spf: Sender Policy Framework (RFC 7208) for the MAIL FROM identity and the HELO name.

The check runs at MAIL (the HELO check once per HELO name, in parallel with it) and is
published at once in ``tx.results`` — ``tx.results.get("spf").data`` is ``{"result": "pass",
"domain": "example.org", "identity": "mailfrom", ...}`` with the HELO result under ``"helo"``
— so later rules (the greylist pools senders by an SPF-passed domain) read it. The decision is given at RCPT, like
other refusals, so ``postmaster`` stays reachable. Each identity's result is also reported
as an RFC 8601 auth result (``tx.results.auth``); with ``header: true`` it asks the gate to
write its ``Authentication-Results`` header (under the gate's ``hostname``), which carries
it whenever another rule (dkim, dmarc) asks anyway.
"""
from __future__ import annotations

import asyncio
import re
import socket

from smtpgate import Option, OptionError, Rule, Verdict, boolean, one_of, string
from .check import check_helo as spf_check_helo, check_mailfrom as spf_check_mailfrom

ACTIONS = ("accept", "tempfail", "reject")
_ADDR_SAFE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+\Z")
_TOKEN = re.compile(r"^[A-Za-z0-9.-]+\Z")


class Spf(Rule):
    """Check SPF; refuse (or defer) what the sender's policy says to."""

    name = "spf"
    check_helo = Option(boolean, True, "also check the HELO name (RFC 7208 §2.3); a HELO fail "
                                       "is treated like a MAIL FROM fail")
    on_fail = Option(one_of(*ACTIONS), "reject", "result fail: 550 5.7.23, 451 4.7.23 or accept")
    on_softfail = Option(one_of(*ACTIONS), "accept", "result softfail")
    on_permerror = Option(one_of(*ACTIONS), "accept", "result permerror (a broken record)")
    on_dns_error = Option(one_of("accept", "tempfail"), "accept",
                          "result temperror (SERVFAIL, timeout, DNS budget spent): accept or 451 4.7.24")
    header = Option(boolean, False, "have the gate write its Authentication-Results header for the "
                                    "SPF result alone (dkim and dmarc ask for it anyway)")
    authserv_id = Option(string, "", "the receiving host in %{r} macros; default: this host's name "
                                      "(the header's authserv-id is the gate's hostname)")

    def setup(self):
        self._authserv = self.authserv_id or socket.gethostname() or "localhost"
        if not _TOKEN.match(self._authserv):
            raise OptionError("authserv_id", f"expected a host name, got {self._authserv!r}")

    async def on_mail(self, tx):
        session = tx.session
        if self.gate.resolver is None:
            raise RuntimeError("spf needs the gate's resolver")
        dns = self.gate.resolver.for_session(session)
        kw = {"receiver": self._authserv, "now": self.clock.now()}
        helo_name = session.helo or ""
        helo_task = None
        if self.check_helo or not tx.sender:
            cached = session.data.get("spf_helo")
            if cached is not None and cached[0] == helo_name:
                helo_result = cached[1]
            else:
                helo_task = spf_check_helo(dns, session.client_ip, helo_name, **kw)
        if tx.sender:
            coros = [spf_check_mailfrom(dns, session.client_ip, tx.sender, helo_name, **kw)]
            if helo_task is not None:
                coros.append(helo_task)
            results = await asyncio.gather(*coros)
            mailfrom = results[0]
            if helo_task is not None:
                helo_result = results[1]
        elif helo_task is not None:
            helo_result = mailfrom = await helo_task
        else:
            mailfrom = helo_result
        if self.check_helo or not tx.sender:
            session.data["spf_helo"] = (helo_name, helo_result)
        published = mailfrom.as_dict()
        if self.check_helo and tx.sender:
            published["helo"] = helo_result.as_dict()
        self._report(tx.results, published)
        return None

    async def on_rcpt(self, tx, rcpt):
        spf = self._published(tx)
        if spf is None:
            return None
        verdict = self._decide(spf, spf["identity"])
        if verdict is None and "helo" in spf:
            verdict = self._decide(spf["helo"], "helo")
        return verdict

    # --- helpers -------------------------------------------------------------------------
    def _report(self, results, published: dict) -> None:
        """Each identity's result as an outcome (``pass: mailfrom example.org``), the whole
        as the record's data."""
        kinds = {"pass": "pass_", "fail": "fail", "softfail": "fail", "permerror": "err", "temperror": "err"}
        for spf in (published, published.get("helo")):
            if spf:
                text = f"{spf.get('identity')} {spf.get('domain') or '-'}: {spf['result']}"
                results.add(self, **{kinds.get(spf["result"], "msg"): text})
                self._report_auth(results, spf)
        results.add(self, data=published)

    def _published(self, tx) -> dict | None:
        record = tx.results.get(self)
        return record.data if record is not None and "result" in record.data else None

    def _decide(self, spf: dict, identity: str) -> Verdict | None:
        result, domain = spf["result"], spf.get("domain", "")
        what = "HELO name" if identity == "helo" else "sender"
        action = {"fail": self.on_fail, "softfail": self.on_softfail,
                  "permerror": self.on_permerror, "temperror": self.on_dns_error}.get(result, "accept")
        if action == "accept":
            return None
        reason = f"spf {result} for {what} domain {domain}" + (f": {spf['problem']}" if spf.get("problem") else "")
        if result == "temperror":
            return Verdict.tempfail(f"Temporary SPF error for {domain}, try again later", 451, "4.7.24",
                                    reason=reason)
        enhanced = "7.24" if result == "permerror" else "7.23"
        text = {"fail": f"SPF of {domain} does not allow this client to send for the {what}",
                "softfail": f"SPF of {domain} suggests this client is not allowed to send for the {what}",
                "permerror": f"SPF record of {domain} is broken"}[result]
        if result == "fail" and spf.get("explanation"):
            text += f": {spf['explanation']}"
        text = "".join(c for c in text if c.isprintable())[:400]
        if action == "tempfail":
            return Verdict.tempfail(text, 451, "4." + enhanced, reason=reason)
        return Verdict.reject(text, 550, "5." + enhanced, reason=reason)

    def _report_auth(self, results, spf: dict) -> None:
        """The identity's result for the gate's Authentication-Results header (RFC 8601 §2.7.2):
        ``spf=pass smtp.mailfrom=a@example.org`` or ``spf=none smtp.helo=mail.example.org``."""
        if spf.get("identity") == "helo":
            name = spf.get("domain", "")
            results.auth(self, "spf", spf["result"], header=self.header,
                         smtp_helo=name if _TOKEN.match(name or "") else None)
            return
        sender = spf.get("sender", "")
        value = sender if _ADDR_SAFE.match(sender) else spf.get("domain", "")
        results.auth(self, "spf", spf["result"], header=self.header,
                     smtp_mailfrom=value if _TOKEN.match(value.rpartition("@")[2] or "-") else None)
