"""Listing archives with the standard library, within limits (zip bombs end as "over limits").

zip (``zipfile``), tar in every compression ``tarfile`` reads, and single gzip / bzip2 / xz
streams. Entries are returned with every name a reader might use (zip keeps a name in the
central directory, in each local header and sometimes in a Unicode extra field: all three)
and with their first bytes, or all of them when they are containers to look into.
"""
from __future__ import annotations

import bz2
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field

RATIO_FLOOR = 1024 * 1024  # below this many bytes out, no compression ratio is suspicious


class OverLimits(Exception):
    """Listing or unpacking would pass a limit (entries, bytes, ratio): a possible bomb."""


class Unreadable(Exception):
    """Corrupt, truncated or using a method the standard library cannot unpack."""


@dataclass
class Budget:
    entries: int
    bytes: int
    ratio: float

    def take_entry(self) -> None:
        self.entries -= 1
        if self.entries < 0:
            raise OverLimits("too many archive entries")

    def cap(self, compressed: int) -> int:
        """How many bytes one member may unpack to."""
        return max(0, min(self.bytes, max(RATIO_FLOOR, int(self.ratio * max(compressed, 1)))))

    def spend(self, n: int) -> None:
        self.bytes -= n
        if self.bytes < 0:
            raise OverLimits("archive contents over the size limit")


@dataclass
class Entry:
    names: list[str]
    data: bytes = b""           # the head, or everything when ``complete``
    complete: bool = False
    encrypted: bool = False
    is_dir: bool = False
    notes: list[str] = field(default_factory=list)


# --- zip ---------------------------------------------------------------------------------
def list_zip(data: bytes, budget: Budget, head: int, want_all) -> tuple[list[Entry], Exception | None]:
    """Every entry with its names, then their contents as far as limits allow. The exception
    (``OverLimits`` or ``Unreadable``) that stopped the reading comes back beside the entries
    listed so far: their names still count. ``want_all(head_bytes, name)`` says whether an
    entry must be read whole (a container to look into)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError,
            RuntimeError, NotImplementedError, struct.error, UnicodeDecodeError) as e:
        return [], Unreadable(f"corrupt zip ({type(e).__name__})")
    out: list[Entry] = []
    try:
        for info in infos:
            budget.take_entry()
            out.append(Entry(_zip_names(data, info), encrypted=bool(info.flag_bits & 0x1),
                             is_dir=info.is_dir()))
        for info, entry in zip(infos, out):
            if entry.encrypted or entry.is_dir:
                continue
            if info.file_size > RATIO_FLOOR and info.file_size > budget.ratio * max(info.compress_size, 1):
                raise OverLimits(f"compression ratio over {budget.ratio:g}")
            _read_zip_entry(zf, info, entry, budget, head, want_all)
    except (OverLimits, Unreadable) as e:
        return out, e
    return out, None


def _read_zip_entry(zf, info, entry: Entry, budget: Budget, head: int, want_all) -> None:
    cap = budget.cap(info.compress_size)
    try:
        with zf.open(info) as f:
            first = _read_head(f, min(head, cap))
            budget.spend(len(first))
            if want_all(first, entry.names[0] if entry.names else ""):
                rest = f.read(cap - len(first) + 1)
                budget.spend(len(rest))
                if len(first) + len(rest) > cap:
                    raise OverLimits(f"an entry unpacks past {cap} bytes")
                entry.data, entry.complete = first + rest, True
            else:
                entry.data = first
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError,
            NotImplementedError, zlib.error, lzma.LZMAError, struct.error) as e:
        raise Unreadable(f"zip entry cannot be read ({type(e).__name__}: {e})") from None


def _zip_names(data: bytes, info: zipfile.ZipInfo) -> list[str]:
    names = [info.filename]
    off = info.header_offset
    if 0 <= off and data[off:off + 4] == b"PK\x03\x04" and off + 30 <= len(data):
        nlen = int.from_bytes(data[off + 26:off + 28], "little")
        raw = data[off + 30:off + 30 + nlen]
        names.append(raw.decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace"))
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    extra, pos = info.extra, 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 0x7075 and size > 5:  # Info-ZIP Unicode Path
            names.append(extra[pos + 9:pos + 4 + size].decode("utf-8", "replace"))
        pos += 4 + size
    return list(dict.fromkeys(n for n in names if n))


def _read_head(f, head: int) -> bytes:
    """The first 4 KB; up to ``head`` when they are all zero (ISO/UDF images start so)."""
    first = f.read(min(4096, head))
    if len(first) == 4096 and not first.strip(b"\x00") and head > 4096:
        first += f.read(head - 4096)
    return first


# --- tar and single compressed streams ---------------------------------------------------
def decompress(data: bytes, kind: str, budget: Budget) -> bytes:
    cap = budget.cap(len(data))
    try:
        if kind == "gzip":
            out, rest = [], data
            total = 0
            while rest and total <= cap:  # gzip files may hold several members
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                chunk = d.decompress(rest, cap + 1 - total)
                out.append(chunk)
                total += len(chunk)
                if d.unconsumed_tail or not d.eof:
                    break
                rest = d.unused_data
                if rest[:2] != b"\x1f\x8b":
                    break
            plain = b"".join(out)
        elif kind == "bzip2":
            plain = bz2.BZ2Decompressor().decompress(data, max_length=cap + 1)
        else:
            plain = lzma.LZMADecompressor().decompress(data, max_length=cap + 1)
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as e:
        raise Unreadable(f"corrupt {kind} stream ({type(e).__name__})") from None
    budget.spend(len(plain))
    if len(plain) > cap:
        raise OverLimits(f"{kind} stream unpacks past {cap} bytes")
    return plain


def gzip_name(data: bytes) -> str | None:
    """The original file name a gzip header records (FNAME), if any."""
    if len(data) < 10 or not data[3] & 0x08:
        return None
    pos = 10
    if data[3] & 0x04:
        pos += 2 + int.from_bytes(data[10:12], "little")
    end = data.find(b"\x00", pos, pos + 4096)
    return data[pos:end].decode("latin-1") if end > pos else None


def list_tar(data: bytes, budget: Budget, head: int, want_all) -> tuple[list[Entry], Exception | None]:
    """Like ``list_zip``: the entries read, and what stopped the reading, if anything."""
    out: list[Entry] = []
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        while True:
            member = tf.next()
            if member is None:
                break
            budget.take_entry()
            names = [member.name] + ([member.linkname] if member.linkname else [])
            entry = Entry(names, is_dir=not member.isfile())
            out.append(entry)
            if not member.isfile():
                continue
            f = tf.extractfile(member)
            first = _read_head(f, head) if f else b""
            budget.spend(len(first))
            if f is not None and want_all(first, member.name):
                rest = f.read(max(0, member.size - len(first)))
                budget.spend(len(rest))
                entry.data, entry.complete = first + rest, True
            else:
                entry.data = first
    except OverLimits as e:
        return out, e
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError) as e:
        return out, Unreadable(f"corrupt tar ({type(e).__name__})")
    return out, None


def is_tar(data: bytes) -> bool:
    if data[257:262] == b"ustar":
        return True
    try:
        with tarfile.open(fileobj=io.BytesIO(data[:10240]), mode="r:") as tf:
            return tf.next() is not None
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError):
        return False
