"""The seal stage's contract: headers a rule stages, which the pipeline applies all or none.

``on_seal`` runs once the message is final: after every rule's ``on_data`` and after the
gate's own ``Authentication-Results`` field. A hook there signs or stamps what will be
relayed (an ARC set, a DKIM signature), so it may only *add header fields on top*: that
keeps every earlier signature valid, including another seal-stage rule's. It stages its
fields on the ``seal`` it is given and never edits ``tx.message`` itself; the runner then
prepends them in one edit — only if the hook returned normally and the rule is not in shadow
mode — so a crashing or shadow rule cannot leave part of a set behind.
"""
from __future__ import annotations

from ..mail.message import check_folded_field


class SealEditError(RuntimeError):
    """A seal-stage hook edited the message instead of staging fields on its ``seal``."""


class Seal:
    """What one rule's ``on_seal`` adds: ``seal.prepend(name, value)`` per field, in the order
    they should stand from the top. Values may be folded (CRLF followed by a space or tab,
    as signatures are); anything else that could start a new line is refused at once."""

    def __init__(self) -> None:
        self._fields: list[tuple[str, str]] = []

    def prepend(self, name: str, value: str) -> None:
        """Stage ``Name: value`` to go above the message's fields (after those staged
        before it: stage a set top to bottom). ValueError for a bad name or value."""
        check_folded_field(name, value)
        self._fields.append((name, value))

    @property
    def fields(self) -> list[tuple[str, str]]:
        """The staged fields, top to bottom."""
        return list(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


def check_untouched(message, mark) -> None:
    """Raise ``SealEditError`` when ``message`` changed since ``mark`` (its checkpoint)."""
    # Every edit method records a change (reading ``raw`` may re-join the pieces, which is
    # no edit): the change list and the held list tell.
    _, changes, held = mark
    if len(message.changes) > changes or len(message.held) > held:
        raise SealEditError("on_seal may not edit the message; stage header fields with "
                            "seal.prepend(name, value)")
