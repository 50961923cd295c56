"""dkim: verify every DKIM-Signature (RFC 6376; RSA and Ed25519, RFC 8463) at DATA.

The selector keys are fetched first, all at once, through the gate's asynchronous resolver
(cached, charged to the session's DNS budget); dkimpy then verifies over those answers
(``verify.py``), so the event loop never waits on DNS inside it. Each signature is
published — ``tx.results.get("dkim").data["signatures"]``: ``[{"domain", "selector",
"algorithm", "identity", "result", "reason"}, ...]`` — and reported as an RFC 8601 ``dkim``
result, so the gate's Authentication-Results header carries it and the dmarc rule reads it.
Put it before any rule that edits the message.
"""
from __future__ import annotations

import asyncio

from smtpgate import DnsError, Option, Rule, Verdict, integer, list_of, one_of, size, string
from .author import author_domains
from .verify import Checker, Verified, key_record

ACTIONS = ("accept", "tempfail", "reject")


class Dkim(Rule):
    """Verify DKIM signatures; refuse what the listed domains' failures say to."""

    name = "dkim"
    domains = Option(list_of(string), [], "signing domains (d=) whose failed signature gets on_fail "
                                          "(.example.org: its subdomains too)")
    on_fail = Option(one_of(*ACTIONS), "reject", "a listed domain's signature fails and none of "
                                                 "its signatures passes: 550 5.7.20, 451 4.7.20 or accept")
    require = Option(list_of(string), [], "author (From:) domains that must carry a passing signature "
                                          "of their own domain or a parent; without one: on_missing")
    on_missing = Option(one_of(*ACTIONS), "reject", "a required signature is missing or failed: "
                                                    "550 5.7.20, 451 4.7.20 or accept")
    on_dns_error = Option(one_of("accept", "tempfail"), "tempfail",
                          "a listed or required domain's key lookup failed: 451 4.7.20 or accept")
    max_signatures = Option(integer, 5, "signatures checked per message (the rest: neutral, not checked)")
    thread_above = Option(size, "128k", "messages larger than this are verified in a worker thread")

    def setup(self):
        self._domains = [d.lower().rstrip(".") for d in self.domains]
        self._require = [d.lower().rstrip(".") for d in self.require]

    async def on_data(self, tx, message):
        resolver = self.gate.resolver
        if resolver is None:
            raise RuntimeError("dkim needs the gate's resolver")
        raw = message.raw
        big = len(raw) > self.thread_above
        checker = await asyncio.to_thread(Checker, raw) if big else Checker(raw)
        sigs = checker.signatures[:self.max_signatures]
        found = await resolver.for_session(tx.session).resolve_many((s.key_name for s in sigs if s.key_name), "TXT")
        keys = {n: a if isinstance(a, DnsError) else key_record(a) for n, a in found.items()}
        now = self.clock.now()

        def verify_all() -> list[Verified]:
            out = []
            for s in sigs:
                key = keys.get(s.key_name)
                out.append(Verified(s, "temperror", f"key lookup failed: {key.kind}") if isinstance(key, DnsError)
                           else checker.verify(s, key, now))
            return out

        verified = await asyncio.to_thread(verify_all) if big else verify_all()
        self._report(tx.results, verified, len(checker.signatures) - len(sigs))
        # the From field is parsed only when some author domain must be signed for
        return self._decide(verified, author_domains(message) if self._require else [])

    def _report(self, results, verified: list[Verified], unchecked: int) -> None:
        kinds = {"pass": "pass_", "fail": "fail", "temperror": "err", "permerror": "fail"}
        for v in verified:
            s = v.signature
            text = f"{s.domain or '-'} s={s.selector or '-'}: {v.result}" + (f" ({v.reason})" if v.reason else "")
            results.add(self, **{kinds.get(v.result, "msg"): text})
            results.auth(self, "dkim", v.result, reason=v.reason, header_d=s.domain or None,
                         header_s=s.selector or None, header_a=s.algorithm or None)
        if not verified:
            results.add(self, skip="no signature")
            results.auth(self, "dkim", "none")
        if unchecked:  # one line for all of them: a message may carry thousands
            results.add(self, msg=f"{unchecked} more signatures not checked (max_signatures {self.max_signatures})")
        results.add(self, data={"signatures": [v.as_dict() for v in verified], "unchecked": unchecked})

    def _decide(self, verified: list[Verified], authors: list[str]) -> Verdict | None:
        passed = {v.signature.domain for v in verified if v.result == "pass"}
        for v in verified:
            d = v.signature.domain
            if v.result == "pass" or not d or not _listed(d, self._domains) or d in passed:
                continue
            return self._refuse(self.on_fail, v, f"dkim {v.result} for {d}: {v.reason}")
        # every From domain is an author (several From addresses or fields): a required one
        # hidden beside another must still be signed for
        for author in authors:
            if not _listed(author, self._require) or any(author == d or author.endswith("." + d) for d in passed):
                continue
            own = [v for v in verified if author == v.signature.domain or author.endswith("." + v.signature.domain)]
            worst = next((v for v in own if v.result == "temperror"), None)
            return self._refuse(self.on_missing, worst, f"no passing dkim signature for {author}")
        return None

    def _refuse(self, action: str, v: Verified | None, reason: str) -> Verdict | None:
        if v is not None and v.result == "temperror":
            if self.on_dns_error == "accept":
                return None
            return Verdict.tempfail("DKIM key lookup failed, try again later", 451, "4.7.20", reason=reason)
        if action == "accept":
            return None
        text = "No passing DKIM signature found"
        if action == "tempfail":
            return Verdict.tempfail(text, 451, "4.7.20", reason=reason)
        return Verdict.reject(text, 550, "5.7.20", reason=reason)


def _listed(domain: str, listed: list[str]) -> bool:
    return any(domain == d or (d.startswith(".") and domain.endswith(d)) for d in listed)
