"""What a rule decides. A hook returns ``None`` (carry on) or one of these."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..mail.reply import Reply

ACCEPT, REJECT, TEMPFAIL, DISCARD, QUARANTINE = "accept", "reject", "tempfail", "discard", "quarantine"
ACTIONS = (ACCEPT, REJECT, TEMPFAIL, DISCARD, QUARANTINE)


@dataclass(frozen=True)
class Verdict:
    """A symbolic decision; the core turns it into the client's reply.

    - ``accept``: stop running rules at this stage and let the item through (a whitelist).
    - ``reject``: a permanent refusal (default ``550 5.7.1``, ``554 5.7.1`` at DATA).
    - ``tempfail``: come back later (default ``451 4.7.1``).
    - ``discard``: say yes to the client and deliver nothing (logged).
    - ``quarantine``: keep the message out of the mailbox in the quarantine; the client gets
      ``code`` (default ``554 5.7.1``).
    ``reason`` is for logs and traces; ``text`` is what the client reads.
    """

    action: str
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    reason: str | None = None
    data: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown verdict action {self.action!r}")
        if self.code is not None:
            first = str(self.code)[0]
            want = {REJECT: "5", TEMPFAIL: "4"}.get(self.action)
            if want and first != want:
                raise ValueError(f"a {self.action} verdict needs a {want}xx code, got {self.code}")
        if self.text is not None and any(c in self.text for c in "\r\n\x00"):
            raise ValueError("verdict text must be one line without CR, LF or NUL")

    # Constructors, the way rules write them: Verdict.reject("no executables").
    @classmethod
    def accept(cls, reason: str | None = None) -> "Verdict":
        return cls(ACCEPT, reason=reason)

    @classmethod
    def reject(cls, text: str = "Message rejected", code: int | None = None,
               enhanced: str | None = "5.7.1", reason: str | None = None) -> "Verdict":
        return cls(REJECT, code, enhanced, text, reason or text)

    @classmethod
    def tempfail(cls, text: str = "Try again later", code: int = 451,
                 enhanced: str | None = "4.7.1", reason: str | None = None) -> "Verdict":
        return cls(TEMPFAIL, code, enhanced, text, reason or text)

    @classmethod
    def discard(cls, reason: str | None = None) -> "Verdict":
        return cls(DISCARD, reason=reason)

    @classmethod
    def quarantine(cls, text: str = "Message held for review", code: int = 554,
                   enhanced: str | None = "5.7.1", reason: str | None = None) -> "Verdict":
        return cls(QUARANTINE, code, enhanced, text, reason or text)

    def reply(self, stage: str) -> Reply:
        """The reply the client gets for this verdict at ``stage``."""
        if self.action in (ACCEPT, DISCARD):
            return Reply(250, "Ok" if stage != "data" else "Ok: queued", "2.0.0")
        if self.action == TEMPFAIL:
            return Reply(self.code or 451, self.text or "Try again later", self.enhanced or "4.7.1")
        default_code = 554 if stage in ("data", "connect") else 550
        return Reply(self.code or default_code, self.text or "Rejected", self.enhanced or "5.7.1")
