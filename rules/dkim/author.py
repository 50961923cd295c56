"""The author domain: the domain of the message's ``From:`` address (RFC 5322), as DKIM's
``require`` and DMARC (RFC 7489 §3.1) judge it."""
from __future__ import annotations

from email.utils import getaddresses

from smtpgate import Message


def author_domains(message: Message) -> list[str]:
    """The distinct domains of every ``From:`` address, lower case without a final dot, in
    ASCII
    (``[]``: no From with a domain; several: a message DMARC cannot judge, §6.6.1)."""
    # unfolded first (RFC 5322 §2.2.3: CRLF removed, the space kept): parsed folded, a@ex<CRLF>
    # <SP>ample.org would read as the domain "ex", not what a reader sees, example.org
    values = [v.replace("\r\n", "").replace("\n", "") for v in message.get_all("From")]
    found: list[str] = []
    for _, address in getaddresses(values):
        domain = _a_label(address.rpartition("@")[2].strip().rstrip(".").lower()) if "@" in address else ""
        if domain and domain not in found:
            found.append(domain)
    return found


def _a_label(domain: str) -> str:
    """An internationalised domain (``From: a@bänk.example``, SMTPUTF8 mail) as DNS and every
    ``d=`` spell it: ``xn--bnk-qla.example``; what IDNA refuses stays as it is (no record
    will be found for it)."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain
