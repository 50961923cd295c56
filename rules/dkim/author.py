"""The author domain: the domain of the message's ``From:`` address (RFC 5322), as DKIM's
``require`` and DMARC (RFC 7489 §3.1) judge it."""
from __future__ import annotations

from email.utils import getaddresses

from smtpgate import Message


def author_domains(message: Message) -> list[str]:
    """The distinct domains of every ``From:`` address, lower case without a final dot
    (``[]``: no From with a domain; several: a message DMARC cannot judge, §6.6.1)."""
    values = message.get_all("From")
    found: list[str] = []
    for _, address in getaddresses(values):
        domain = address.rpartition("@")[2].strip().rstrip(".").lower() if "@" in address else ""
        if domain and domain not in found:
            found.append(domain)
    return found


def author_domain(message: Message) -> str | None:
    """The one author domain, None when there is none or more than one."""
    found = author_domains(message)
    return found[0] if len(found) == 1 else None
