"""dmarc: RFC 7489 at DATA, from the spf rule's published result and the DKIM results.

The author domain is the ``From:`` domain; its policy record is ``_dmarc.<domain>``, else
``_dmarc.<organisational domain>`` (public suffix list, ``orgdomain.py``), looked up through
the gate's resolver. DMARC passes when SPF passed for a domain aligned with the author
domain, or a DKIM signature passed for one (relaxed or strict, as the record says). On a
failure the domain's policy (``p``; ``sp`` for a subdomain whose record was found at the
organisational domain), sampled by ``pct``, decides: reject -> ``550 5.7.1`` at end of DATA,
quarantine -> the quarantine or a header (``on_quarantine``), none -> recorded. ``soften``
caps that per author domain. Put it after spf and dkim.

No aggregate reports are sent; ``tx.results.get("dmarc").data`` holds what one would need
(the record's tags with ``rua``, the policy applied and why, each aligned identifier).
"""
from __future__ import annotations

import random

from smtpgate import DnsError, Message, Option, OptionError, Rule, Verdict, mapping_of, one_of, string
from smtpgate_rules.dkim.author import author_domains
from .orgdomain import aligned, org_domain
from .record import POLICIES, Record, parse

_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_SEVERITY = {"none": 0, "quarantine": 1, "reject": 2}
#: From domains evaluated per message (each costs up to two lookups); MUAs show the first
MAX_AUTHORS = 5


class Dmarc(Rule):
    """Follow the author domain's DMARC policy."""

    name = "dmarc"
    on_quarantine = Option(one_of("quarantine", "header", "accept"), "quarantine",
                           "p=quarantine: hold it in the quarantine, or deliver it with quarantine_header")
    quarantine_header = Option(string, "X-DMARC-Quarantine", "the header added when on_quarantine is header")
    soften = Option(mapping_of(one_of(*POLICIES)), {},
                    "author domain (.example.org: subdomains too; *: any) -> the strongest policy "
                    "applied for it: none or quarantine (reject: no softening)")
    on_dns_error = Option(one_of("accept", "tempfail"), "accept",
                          "the policy lookup failed (temperror): accept or 451 4.7.1")

    #: where pct sampling takes its numbers (``random()`` in [0, 1)); a test sets its own
    random = random.SystemRandom()  # no state a forked worker would share

    def setup(self):
        self._soften = {k.lower().rstrip("."): v for k, v in self.soften.items()}
        if len(self.quarantine_header) > 76 or not Message.is_field_name(self.quarantine_header):
            raise OptionError("quarantine_header", f"expected a header name, got {self.quarantine_header!r}")

    async def on_data(self, tx, message):
        resolver = self.gate.resolver
        if resolver is None:
            raise RuntimeError("dmarc needs the gate's resolver")
        authors = author_domains(message)
        if not authors:
            tx.results.add(self, skip="no From domain", data={"result": "none", "reason": "no From domain"})
            tx.results.auth(self, "dmarc", "none", reason="no From domain")
            return None
        # §6.6.1: several From addresses (or fields) — each domain is an author domain, the
        # strictest policy among those that fail applies; a hidden p=reject domain is no way out
        dns = resolver.for_session(tx.session)
        judged = [await self._judge(tx, dns, author) for author in authors[:MAX_AUTHORS]]
        if len(authors) > MAX_AUTHORS:
            tx.results.add(self, msg=f"{len(authors) - MAX_AUTHORS} more From domains not checked")
        worst = max(judged, key=lambda j: _SEVERITY[j[1]["disposition"] if j[1]["result"] == "fail" else "none"])
        temperror = next((j for j in judged if j[1]["result"] == "temperror"), None)
        data = dict(worst[1])
        if len(judged) > 1:
            data["authors"] = [j[1] for j in judged]
        tx.results.add(self, data=data)
        if worst[1]["result"] == "fail" and worst[1]["disposition"] != "none":
            return self._act(message, worst[0], worst[1]["disposition"])
        if temperror is not None and self.on_dns_error == "tempfail":
            return Verdict.tempfail("DMARC policy lookup failed, try again later", 451, "4.7.1",
                                    reason=f"dmarc temperror for {temperror[0]}: {temperror[1]['error']}")
        return None

    async def _judge(self, tx, dns, author: str) -> tuple[str, dict]:
        """One author domain's evaluation, reported (its line, its Authentication-Results
        entry): ``(author, data)``."""
        try:
            record, policy_domain = await self._lookup(dns, author)
        except DnsError as e:
            tx.results.add(self, err=f"{author}: policy lookup failed: {e.kind}")
            tx.results.auth(self, "dmarc", "temperror", header_from=author)
            return author, {"result": "temperror", "from_domain": author, "disposition": "none", "error": str(e)}
        data = self._evaluate(tx, author, record, policy_domain)
        if record is None:
            tx.results.add(self, skip=f"{author}: no DMARC record")
            tx.results.auth(self, "dmarc", "none", header_from=author)
            return author, data
        comment = f"p={record.p.upper()} sp={(record.sp or record.p).upper()} dis={data['disposition'].upper()}"
        tx.results.auth(self, "dmarc", data["result"], comment=comment, header_from=author,
                        policy_dmarc=data["policy"])
        if data["result"] == "pass":
            tx.results.add(self, pass_=f"{author}: aligned {' and '.join(data['aligned'])}")
        else:
            tx.results.add(self, fail=f"{author}: policy {data['policy']}, applied {data['disposition']}"
                                      + (f" ({data['override']})" if data.get("override") else ""))
        return author, data

    async def _lookup(self, dns, author: str) -> tuple[Record | None, str]:
        """§6.6.3: the author domain's record, else its organisational domain's."""
        org = org_domain(author)
        for domain in dict.fromkeys((author, org)):
            found = [r for r in map(parse, await dns.resolve(f"_dmarc.{domain}", "TXT")) if r]
            if len(found) == 1:
                return found[0], domain
            if found:  # §6.6.3 step 5: several records end the discovery, DMARC does not apply
                return None, author
        return None, author

    def _evaluate(self, tx, author: str, record: Record | None, policy_domain: str) -> dict:
        """The result, the policy, what is applied and why: everything an aggregate report
        row would need."""
        spf = self._spf(tx)
        dkim = [{"domain": a.get("header", "d"), "selector": a.get("header", "s"), "result": a.result}
                for a in tx.results.auth_results("dkim") if a.get("header", "d")]
        data = {"from_domain": author, "org_domain": org_domain(author), "policy_domain": policy_domain,
                "source_ip": tx.session.client_ip, "envelope_from": tx.sender_domain, "spf": spf, "dkim": dkim}
        if record is None:
            return {**data, "result": "none", "policy": "none", "disposition": "none", "aligned": []}
        found = []
        if spf and spf["result"] == "pass" and aligned(spf["domain"], author, record.aspf == "s"):
            spf["aligned"] = True
            found.append("spf")
        for d in dkim:
            d["aligned"] = d["result"] == "pass" and aligned(d["domain"], author, record.adkim == "s")
        if any(d["aligned"] for d in dkim):
            found.append("dkim")
        policy = record.sp if policy_domain != author and record.sp else record.p
        data.update(record=record.as_dict(), result="pass" if found else "fail", policy=policy,
                    aligned=found, disposition="none")
        if found or policy == "none":
            return data
        disposition = policy
        if record.pct < 100:  # §6.6.4: outside the sample, the next weaker policy
            data["sampled"] = self.random.random() * 100 < record.pct
            if not data["sampled"]:
                disposition, data["override"] = _WEAKER[policy], "sampled_out"
        cap = self._cap(author)
        if cap is not None and POLICIES.index(cap) < POLICIES.index(disposition):
            disposition, data["override"] = cap, "local_policy"
        data["disposition"] = disposition
        return data

    @staticmethod
    def _spf(tx) -> dict | None:
        """The spf rule's published result for the identity DMARC uses: MAIL FROM, or the
        HELO name for the null sender (§4.1)."""
        record = tx.results.get("spf")
        spf = record.data if record is not None and not record.shadow else {}
        if "result" not in spf or not spf.get("domain"):
            return None
        return {"domain": spf["domain"], "result": spf["result"], "identity": spf.get("identity"), "aligned": False}

    def _cap(self, author: str) -> str | None:
        org = org_domain(author)
        for key in (author, org):
            if key in self._soften:
                return self._soften[key]
        return next((v for k, v in self._soften.items() if k.startswith(".") and author.endswith(k)),
                    self._soften.get("*"))

    def _act(self, message, author: str, disposition: str) -> Verdict | None:
        author = _shown(author)
        reason = f"dmarc fail for {author}: {disposition}"
        if disposition == "reject":
            return Verdict.reject(f"Unauthenticated email from {author} is not accepted due to its "
                                  f"domain's DMARC policy", 550, "5.7.1", reason=reason)
        if disposition != "quarantine" or self.on_quarantine == "accept":
            return None
        if self.on_quarantine == "header":
            message.prepend_header(self.quarantine_header, f"dmarc fail, policy of {author}")
            return None
        return Verdict.quarantine(f"Message held for review: DMARC policy of {author}", reason=reason)


def _shown(domain: str) -> str:
    """The author domain as the reply and the header may carry it: printable ASCII. A From
    domain with a NUL or 8-bit junk still has a policy (its organisational domain's), and
    writing it raw would crash the rule: a 451 on every retry."""
    return "".join(c if " " < c < "\x7f" else "?" for c in domain)
