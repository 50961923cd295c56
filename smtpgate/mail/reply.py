"""SMTP replies as values: the front writes them, the relay returns them, rules build them."""
from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\Z")
# Enhanced codes for replies that arrive without one (aiosmtpd's built-ins, old downstreams).
_DEFAULT_ENHANCED = {
    221: "2.0.0", 250: "2.0.0", 251: "2.1.5", 252: "2.5.0",
    421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 550: "5.7.1", 551: "5.1.6", 552: "5.3.4", 553: "5.1.3",
    554: "5.7.1", 555: "5.5.4",
}


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: ``code``, optional ``enhanced`` status (``"5.7.1"``) and text lines."""

    code: int
    text: str = ""
    enhanced: str | None = None

    @classmethod
    def parse(cls, line: str) -> "Reply":
        """``"550 5.7.1 no thanks"`` -> Reply(550, "no thanks", "5.7.1")."""
        code_s, _, rest = line.strip().partition(" ")
        if not (len(code_s) == 3 and code_s.isdigit() and code_s[0] in "2345"):
            raise ValueError(f"not an SMTP reply: {line!r}")
        first, _, tail = rest.partition(" ")
        if _ENHANCED.match(first) and first[0] == code_s[0]:
            return cls(int(code_s), tail, first)
        return cls(int(code_s), rest, None)

    @classmethod
    def from_downstream(cls, code: int, message: str) -> "Reply":
        """A reply as aiosmtplib hands it over: code and lines joined by newlines.

        Kept as the downstream said it, enhanced code included, so it passes through unchanged."""
        lines = message.split("\n")
        first, _, tail = lines[0].partition(" ")
        if _ENHANCED.match(first) and first[0] == str(code)[0]:
            rest = [tail] + lines[1:]
            # Continuation lines repeat the enhanced code; keep them verbatim.
            return cls(code, "\n".join(rest), first)
        return cls(code, message, None)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_enhanced(self) -> "Reply":
        """The same reply, with the usual enhanced code filled in where it had none."""
        if self.enhanced or self.code not in _DEFAULT_ENHANCED:
            return self
        return Reply(self.code, self.text, _DEFAULT_ENHANCED[self.code])

    def lines(self) -> list[str]:
        """Wire lines without CRLF: ``550-5.7.1 a`` / ``550 5.7.1 b``."""
        texts = self.text.split("\n") if self.text else [""]
        out = []
        for i, t in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            if self.enhanced and not (i > 0 and t.startswith(self.enhanced)):
                t = f"{self.enhanced} {t}" if t else self.enhanced
            out.append(f"{self.code}{sep}{t}".rstrip())
        return out

    def __str__(self) -> str:
        return "\r\n".join(self.lines())
