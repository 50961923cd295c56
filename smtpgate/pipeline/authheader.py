"""The gate's one ``Authentication-Results`` header (RFC 8601), built with ``authres``.

Rules report per-method results with ``results.auth(...)`` (``pipeline/results.py``): fcrdns
its iprev in ``session.results``, spf, dkim, dmarc (and arc) theirs in ``tx.results``. When
the DATA stage has accepted the message, the conversation calls ``add_authentication_results``
once: if some result asks for the header, one field carrying every (non-shadow) result, under
the gate's authserv-id (its ``hostname``), is prepended. Fields already claiming that id were
removed before any rule ran (``Message.remove_authentication_results``), so what the
downstream sees under our id is ours alone.
"""
from __future__ import annotations

import re
from collections import Counter

from authres import AuthenticationResult, AuthenticationResultProperty, AuthenticationResultsHeader

from .results import AuthResult

AUTH_RESULTS = "Authentication-Results"
# SMTP's line limit is 1000 with CRLF; a header line is kept well below, results dropped past it
MAX_LINE = 990
# what may not appear in a comment's text: its delimiters and quoting (a comment must close)
_COMMENT_UNSAFE = re.compile(r"[()\\]")


def collected(tx) -> list[AuthResult]:
    """Every authentication result of the transaction, the session's (iprev) first."""
    return tx.session.results.auth_results() + tx.results.auth_results()


def header_value(authserv_id: str, results: list[AuthResult]) -> str:
    """The field's value: ``gate.example; spf=pass smtp.mailfrom=a@example.org; dkim=...``
    (``authserv_id; none`` without results). Results that would make the line longer than
    SMTP allows are left out: those of a method reported several times (dkim, one per
    signature) first, the later ones first; so a message's own signatures can never push
    its dmarc or arc verdict out of the header."""
    built = [_result(r) for r in results]
    repeated = Counter(r.method for r in results)
    length, keep = len(AUTH_RESULTS) + 2 + len(authserv_id), set()
    for i in sorted(range(len(built)), key=lambda i: (repeated[results[i].method] > 1, i)):
        size = 2 + len(str(built[i]))  # measured one by one: linear in a flood of results
        if length + size <= MAX_LINE:
            keep.add(i)
            length += size
    built = [b for i, b in enumerate(built) if i in keep]
    while True:  # the field as authres writes it decides; at most a few results go here
        value = str(AuthenticationResultsHeader(authserv_id=authserv_id, results=built))
        value = value.partition(": ")[2]
        if len(AUTH_RESULTS) + 2 + len(value) <= MAX_LINE or not built:
            return value
        built.pop()


def add_authentication_results(tx, authserv_id: str) -> str | None:
    """Prepend the gate's header to ``tx.message`` when a result asks for one; returns the
    value written (None: nothing asked, the message is untouched)."""
    results = collected(tx)
    if not any(r.header for r in results):
        return None
    value = header_value(authserv_id, results)
    tx.message._current_rule = "gate"  # the edit is the gate's own, in the trace of changes
    tx.message.prepend_header(AUTH_RESULTS, value)
    tx.authentication_results = value
    return value


def _result(r: AuthResult) -> AuthenticationResult:
    props = [AuthenticationResultProperty(t, n, a) for t, n, v in r.properties
             if (a := _ascii_value(v)) is not None]
    comment = _COMMENT_UNSAFE.sub(" ", _ascii_text(r.comment)) if r.comment else None
    return AuthenticationResult(r.method, result=r.result, result_comment=comment,
                                reason=_ascii_text(r.reason) if r.reason else None, properties=props)


def _ascii_text(text: str) -> str:
    """A reason or comment in ASCII: the header must not carry 8-bit text the downstream
    may not accept (RFC 8601 §2.2 wants RFC 6532 for that), so other characters become ?."""
    return text if text.isascii() else "".join(c if c.isascii() else "?" for c in text)


def _ascii_value(value: str) -> str | None:
    """A property value in ASCII: an internationalised domain as its A-label
    (``bänk.example`` -> ``xn--bnk-qla.example``); None (the property is left out) for
    what has no ASCII form (a UTF-8 local part, a name IDNA refuses)."""
    if value.isascii():
        return value
    local, at, domain = value.rpartition("@")
    if not local.isascii():
        return None
    try:
        return local + at + domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
