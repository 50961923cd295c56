"""fcrdns: forward-confirmed reverse DNS of the client, at CONNECT.

PTR of the client IP, then A/AAAA of each name (at most 10); the first name that resolves
back to the IP becomes ``session.client_name`` — what later rules read (greylist host-name
whitelists, senders) and what the downstream gets as ``XCLIENT NAME``. Put it first in the
``default`` policy. Details go to ``session.results`` (``session.results.get("fcrdns")``:
pass with the name, fail without one, err when the lookup failed; its data is
``{"name": ..., "verified": ...}``). The result is also reported as RFC 8601 ``iprev``
(``iprev=pass (mail.example.org) policy.iprev=192.0.2.1``): it rides in the gate's
Authentication-Results header when another rule asks for one, never adding it alone.
"""
from __future__ import annotations

from smtpgate import DnsError, Option, Rule, Verdict, one_of


class Fcrdns(Rule):
    """Find the client's verified host name; optionally refuse clients without one."""

    name = "fcrdns"
    unverified = Option(one_of("accept", "tempfail", "reject"), "accept",
                        "a client without a verified name: accept, 450 4.7.25 or 550 5.7.25 (given at MAIL)")
    on_dns_error = Option(one_of("accept", "tempfail"), "accept",
                          "a failed lookup (SERVFAIL, timeout, DNS budget spent): accept or 450 4.7.25")

    async def on_connect(self, session):
        if session.client_name:  # already known (PROXY/XCLIENT or a test): keep it
            session.results.add(self, pass_=session.client_name,
                                data={"name": session.client_name, "verified": True})
            self._iprev(session, "pass", session.client_name)
            return None
        resolver = self.gate.resolver
        if resolver is None:
            raise RuntimeError("fcrdns needs the gate's resolver")
        try:
            name = await resolver.for_session(session).fcrdns(session.client_ip)
        except DnsError as e:
            session.results.add(self, err=f"lookup failed: {e.kind}",
                                data={"name": None, "verified": False, "error": e.kind})
            self._iprev(session, "temperror", None)
            if self.on_dns_error == "tempfail":
                return Verdict.tempfail(f"Client host rejected: cannot find your hostname, "
                                        f"[{session.client_ip}]", 450, "4.7.25",
                                        reason=f"fcrdns lookup failed: {e}")
            return None
        session.client_name = name
        data = {"name": name, "verified": name is not None}
        if name is None:
            session.results.add(self, fail="no forward-confirmed reverse DNS", data=data)
        else:
            session.results.add(self, pass_=name, data=data)
        self._iprev(session, "fail" if name is None else "pass", name)
        if name is None and self.unverified != "accept":
            text = f"Client host rejected: cannot find your hostname, [{session.client_ip}]"
            if self.unverified == "tempfail":
                return Verdict.tempfail(text, 450, "4.7.25", reason="no forward-confirmed reverse DNS")
            return Verdict.reject(text, 550, "5.7.25", reason="no forward-confirmed reverse DNS")
        return None

    def _iprev(self, session, result: str, name: str | None) -> None:
        # header=False: alone it does not ask for the header (messages stay byte-identical)
        session.results.auth(self, "iprev", result, comment=name, header=False,
                             policy_iprev=session.client_ip)
