"""DATA as it arrives -> the message: terminator, dot-unstuffing, line ends, limits, in one pass.

The front feeds what it reads between 354 and the final dot; this keeps the message as a list
of pieces (the one copy the gate holds) or, past a limit, only the refusal to give after the
final dot. The rules are those of a single search over the whole stream:
- the end is exactly CRLF "." CRLF (a leading CRLF is assumed, so "." CRLF right after 354
  is an empty message); no other line end ends the data (no smuggling);
- a "." after CRLF is dropped (dot-stuffing), then bare CR and bare LF become CRLF;
- the size counts the un-stuffed octets before that normalisation.
Each piece is cut so that no terminator, no CRLF "." and no CR LF pair is split between two
pieces, which makes piecewise processing give the same bytes as the whole-stream one.
"""
from __future__ import annotations

import re
from typing import Callable

from .conversation import TOO_BIG
from ..mail.reply import Reply

TERMINATOR = b"\r\n.\r\n"
STUFFED = b"\r\n."  # a dot at a line start: the terminator's or a stuffed one
READ_CHUNK = 256 * 1024  # what one DATA read takes from the socket's buffer
NO_STORAGE = Reply(452, "Insufficient system storage, try again later", "4.3.1")
_BARE_LINE_END = re.compile(rb"\r\n|\r(?!\n)|\n")


def normalise_line_ends(data: bytes) -> bytes:
    """Bare CR and bare LF become CRLF; NUL and every other byte stay as they are."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data
    return _BARE_LINE_END.sub(b"\r\n", data)


def line_too_long(max_line: int) -> Reply:
    # RFC 5321 §4.5.3.1 gives "500 Line too long" as the reply for this limit.
    return Reply(500, f"Line too long: a message line may hold at most {max_line} octets", "5.5.2")


class DataDecoder:
    """``feed`` what was read; it returns None until the terminator was seen, then the bytes
    that followed it (pipelined commands, to give back). ``result()``: pieces or a Reply."""

    def __init__(self, max_size: int = 0, max_line: int = 0,
                 grow: Callable[[int], bool] | None = None):
        self.max_size, self.max_line, self.grow = max_size, max_line, grow
        self.pieces: list[bytes] = []
        self.refusal: Reply | None = None
        self.size = 0  # un-stuffed octets so far, the assumed leading CRLF included
        self._line = 0  # octets of the unfinished last line of the pieces
        self._at_line_start = False  # the last segment ended with CRLF: a leading "." is stuffing
        self._first = True  # the first segment starts with the assumed CRLF
        self._pending = b"\r\n"

    def feed(self, data: bytes) -> bytes | None:
        pending = self._pending + data
        # One search serves both the terminator and dot-unstuffing: each starts with CRLF ".",
        # and most messages have no other dot at a line start (no unstuffing to do).
        first_dot = pending.find(STUFFED)
        if first_dot < 0:
            end = -1
        elif pending.startswith(TERMINATOR, first_dot):
            end = first_dot
        else:
            end = pending.find(TERMINATOR, first_dot)
        if end >= 0:
            self._pending = b""
            self._segment(pending[:end + 2], first_dot < end)
            return pending[end + len(TERMINATOR):]
        cut = len(pending) - len(TERMINATOR) + 1  # a terminator may be starting after cut
        if cut > 0 and pending[cut - 1] == 13 and pending[cut] == 10:
            cut -= 1  # keep CR LF together
        if cut <= 0:
            self._pending = pending
            return None
        self._pending = pending[cut:]
        self._segment(pending[:cut], 0 <= first_dot < cut)
        return None

    def result(self) -> list[bytes] | Reply:
        return self.refusal if self.refusal is not None else self.pieces

    def _segment(self, segment: bytes, dots: bool) -> None:
        """``dots``: the segment may hold a CRLF "." (False: it holds none, feed searched)."""
        if self.refusal is not None:
            return  # read on to the end, keeping nothing
        stuffed = self._at_line_start and segment.startswith(b".")
        self._at_line_start = segment.endswith(b"\r\n")
        piece = segment.replace(STUFFED, b"\r\n") if dots else segment
        if stuffed:
            piece = piece[1:]
        self.size += len(piece)
        if self._first:
            piece, self._first = piece[2:], False
        piece = normalise_line_ends(piece)
        if self.max_size and self.size - 2 > self.max_size:
            self._refuse(TOO_BIG)
        elif self.max_line and not self._lines_fit(piece):
            self._refuse(line_too_long(self.max_line))
        elif self.grow is not None and not self.grow(self.size):
            self._refuse(NO_STORAGE)
        elif piece:
            self.pieces.append(piece)

    def _refuse(self, reply: Reply) -> None:
        self.refusal = reply
        self.pieces.clear()

    def _lines_fit(self, piece: bytes) -> bool:
        """Whether every line stays within max_line; ``piece`` is CRLF-only and does not end
        with CR. Looks at blocks of max_line + 2 octets: a block without LF is part of a line
        too long, and otherwise only the runs from one block's last LF to the next block's
        first LF need measuring (two finds per block, no copies)."""
        max_line, size = self.max_line, len(piece)
        if self._line + size <= max_line:
            nl = piece.rfind(b"\n")
            self._line = self._line + size if nl < 0 else size - nl - 1
            return True
        block = max_line + 2
        last_lf = -1 - self._line  # where the LF before this piece's first line would be
        for start in range(0, size, block):
            stop = start + block
            first = piece.find(b"\n", start, stop)
            if first < 0:
                if stop <= size:  # a whole block without LF: a line of max_line + 1 or more
                    return False
                continue
            if first - last_lf - 2 > max_line:  # the octets before that CR LF
                return False
            last_lf = piece.rfind(b"\n", first, stop)
        self._line = size - last_lf - 1
        return self._line <= max_line
