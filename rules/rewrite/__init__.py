"""``rewrite``: envelope and header address maps, header operations and a subject tag.

Envelope: ``sender_map`` at MAIL (before the downstream sees ``MAIL FROM``), ``recipient_map``
at each RCPT (the gate checks the new address against the open-relay rules again). Message,
at DATA, in this order: ``remove_headers``, ``replace_headers``, ``header_map`` (addresses in
From, To, Cc, Reply-To, Sender), ``subject_prefix``, ``add_headers``. ``when`` / ``unless``
limit the entry; ``steps`` add further blocks of the same options with conditions of their
own. Every edit is surgical, recorded in the message's changes and named in the trace.
"""
from __future__ import annotations

import logging
import re

from smtpgate import Option, OptionError, Rule

from .headers import Unreadable, add_prefix, decode, has_tag, header_text, rewrite_addresses
from .maps import Context, valid_result
from .options import (DEFAULT_FIELDS, Block, address_map, condition, header_fields, header_names,
                      headers, steps, subject_prefix)



class Rewrite(Rule):
    """Rewrite envelope and header addresses, edit headers, tag subjects."""

    name = "rewrite"
    sender_map = Option(address_map, {}, "envelope sender: old: new (address, @domain, @.domain, /regex/)")
    recipient_map = Option(address_map, {}, "envelope recipients, same forms")
    header_map = Option(address_map, {}, "addresses in the header_fields, same forms")
    header_fields = Option(header_fields, DEFAULT_FIELDS, "the headers header_map rewrites")
    add_headers = Option(headers, {}, "Name: value, prepended (in the order listed)")
    remove_headers = Option(header_names, [], "names (or Prefix-*) whose every instance is removed")
    replace_headers = Option(headers, {}, "Name: value; the first instance edited in place, "
                             "other instances removed, added when absent")
    subject_prefix = Option(subject_prefix, "", "a tag put in front of the Subject, once")
    when = Option(condition, None, "apply only when these conditions hold")
    unless = Option(condition, None, "do not apply when these conditions hold")
    steps = Option(steps, [], "further blocks of these options, each with its own when/unless")

    def setup(self):
        try:
            top = Block(self._options, "rewrite")
        except ValueError as e:
            key = "when" if self.when is not None else "unless"
            raise OptionError(key, str(e).removeprefix("rewrite: ")) from None
        self._blocks = [top]
        for i, step in enumerate(self.steps):
            try:
                self._blocks.append(Block(step, f"steps[{i}]", outer=top))
            except ValueError as e:
                raise OptionError("steps", str(e)) from None
        self._sender = [b for b in self._blocks if b.sender_map]
        self._recipient = [b for b in self._blocks if b.recipient_map]
        self._data = [b for b in self._blocks if b.has_header_ops]
        # Blocks without when/unless apply whatever the envelope: no context to build for them.
        self._data_context = any(b.conditional for b in self._data)
        if not self._sender and not self._recipient:
            # Header edits only: nothing to do at MAIL or RCPT, so the pipeline need not call
            # (nor trace) those hooks for every message.
            self.on_mail = self.on_rcpt = None

    # --- hooks -----------------------------------------------------------------------------
    async def on_mail(self, tx):
        if not tx.sender:
            return None
        ctx = self._context(tx, [])
        for block in self._sender:
            if block.applies(ctx):
                new = block.sender_map.lookup(tx.sender)
                if new:
                    old, tx.sender = tx.sender, self._envelope_address(tx, "sender", tx.sender, new)
                    self._report(tx, "sender", old, tx.sender)
        return None

    async def on_rcpt(self, tx, rcpt):
        original = rcpt.address
        ctx = self._context(tx, [original])
        for block in self._recipient:
            if block.applies(ctx):
                new = block.recipient_map.lookup(rcpt.address)
                if new:
                    old, rcpt.address = rcpt.address, self._envelope_address(tx, "recipient", rcpt.address, new)
                    self._report(tx, "recipient", old, rcpt.address)
        return None

    async def on_data(self, tx):
        if not self._data:
            return None
        ctx = None
        if self._data_context:
            originals = [self._original(tx, "recipients").get(rcpt.address, rcpt.address) for rcpt in tx.recipients]
            ctx = self._context(tx, originals, tx.message)
        before = len(tx.message.changes)
        for block in self._data:
            if not block.conditional or block.applies(ctx):
                self._edit(tx.message, block)
        if self.log.isEnabledFor(logging.DEBUG):  # at info, the transaction line names each change
            for c in tx.message.changes[before:]:
                self.log.debug("tx %s: %s %s: %r -> %r", tx.id, c.op, c.header, c.before, c.after)
        return None

    # --- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _original(tx, what: str) -> dict:
        """``{address now: address before the first rewrite}`` of the rewrites this rule reported."""
        record = tx.results.get("rewrite")
        return record.data.get(what, {}) if record is not None else {}

    def _report(self, tx, what: str, old: str, new: str) -> None:
        """The rewrite as a result: later stages (``when`` conditions) match the original."""
        originals = self._original(tx, what + "s")
        tx.results.add(self, msg=f"{what} <{old}> -> <{new}>",
                       data={what + "s": {**originals, new: originals.get(old, old)}})

    def _context(self, tx, recipients, message=None) -> Context:
        sender = self._original(tx, "senders").get(tx.sender, tx.sender)
        return Context(sender, recipients, tx.session.client_ip,
                       bool(getattr(tx.session, "authenticated", False)), message)

    def _envelope_address(self, tx, what: str, old: str, new: str) -> str:
        """The new address, checked: a map that yields no valid mailbox is a configuration bug,
        answered 451 4.3.0 (the pipeline's rule-crash reply) rather than sent downstream."""
        checked = valid_result(new)
        if checked is None:
            raise ValueError(f"{what} <{old}> rewrites to {new!r}, which is not a valid address")
        if not checked.isascii() and "SMTPUTF8" not in (p.upper() for p in tx.sender_params):
            raise ValueError(f"{what} <{old}> rewrites to <{checked}>, which needs SMTPUTF8")
        self.log.debug("tx %s: %s <%s> -> <%s>", tx.id, what, old, checked)
        return checked

    def _header_address(self, old: str, block: Block) -> str | None:
        new = block.header_map.lookup(old)
        if new is None:
            return None
        checked = valid_result(new)
        if checked is None or (not checked.isascii() and old.isascii()):
            self.log.warning("header address %r would become %r, not a valid address: left as it is", old, new)
            return None
        return checked

    def _edit(self, message, block: Block) -> None:
        if block.edits_fields:
            self._edit_fields(message, block)
        for name, value in block.add_bottom_up:
            message.prepend_header(name, value)

    def _edit_fields(self, message, block: Block) -> None:
        """Removal, replacement, header_map and subject_prefix, in that order (before ``add``)."""
        for name in block.remove:
            if name.endswith("*"):
                prefix = name[:-1].lower()
                for found in dict.fromkeys(f.name.lower() for f in message.fields if f.name.lower().startswith(prefix)):
                    message.remove_header(found)
            else:
                message.remove_header(name)
        for name, value in block.replace:
            message.replace_header(name, value)
        if block.header_map:
            for name in block.fields:
                self._safe_edit(message, name, lambda v: self._rewrite_field(name, v, block))
        if block.prefix:
            subject = message.get("Subject")
            tag = block.prefix.strip()
            if subject is None:
                message.prepend_header("Subject", header_text(tag))
            elif not has_tag(decode(subject), tag):
                self._safe_edit(message, "Subject", lambda v: None if _unsafe(v) else add_prefix(v, block.prefix),
                                first=True)

    def _rewrite_field(self, name: str, value: str, block: Block) -> str | None:
        if _unsafe(value):
            self.log.warning("%s holds NUL, a bare CR or a bare LF: its addresses are left as they are", name)
            return None
        try:
            new, _ = rewrite_addresses(value, lambda a: self._header_address(a, block))
        except Unreadable as e:
            self.log.info("%s is not a readable address list (%s): left as it is", name, e)
            return None
        return new

    def _safe_edit(self, message, name: str, edit, first: bool = False) -> None:
        try:
            message.edit_header(name, edit, first=first)
        except ValueError as e:  # never reached with the editors above; never breaks the message
            self.log.warning("edit of %s refused: %s", name, e)


def _unsafe(value: str) -> bool:
    return bool(re.search(r"\x00|\r(?!\n)|(?<!\r)\n", value))
