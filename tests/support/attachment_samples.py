"""Test fixtures for the attachments rule, generated (no binaries in the repository).

Each builder returns bytes that carry exactly the signature the rule looks for: a minimal
PE/ELF/Mach-O header, an ISO 9660 volume descriptor, an OLE2 compound file with a VBA
project, a TNEF stream, zip/tar/gzip archives (nested, encrypted, bombs), and so on. They
are not working programs; they are what a mail filter sees.
"""
from __future__ import annotations

import base64
import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
import zlib


# --- messages ------------------------------------------------------------------------------
HEAD = (b"From: Sender <sender@sender.example>\r\nTo: rcpt@example.com\r\n"
        b"Subject: attachments test\r\nMessage-ID: <att@sender.example>\r\nMIME-Version: 1.0\r\n")


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def part(data: bytes, name: str | bytes | None = None, ctype: str = "application/octet-stream",
         disposition: str | bytes | None = None, encoding: str = "base64",
         extra: bytes = b"") -> bytes:
    """One MIME part (headers and body, no trailing CRLF before the boundary)."""
    h = f"Content-Type: {ctype}".encode()
    if isinstance(name, str):
        h += f'; name="{name}"'.encode()
    elif isinstance(name, bytes):
        h += b"; " + name
    h += b"\r\n"
    if disposition is None and name is not None:
        disposition = f'attachment; filename="{name}"' if isinstance(name, str) else b"attachment"
    if disposition:
        h += b"Content-Disposition: " + (disposition.encode() if isinstance(disposition, str) else disposition) + b"\r\n"
    if encoding:
        h += f"Content-Transfer-Encoding: {encoding}\r\n".encode()
    body = b64(data) if encoding == "base64" else data
    return h + extra + b"\r\n" + body.rstrip(b"\r\n")


def text_part(text: str = "Hello,\r\nsee the attachment.\r\n") -> bytes:
    return b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n" + \
        text.encode().rstrip(b"\r\n")


def multipart(*parts: bytes, boundary: str = "=_b0und4ry_", subtype: str = "mixed",
              head: bytes = HEAD, preamble: bytes = b"This is a multi-part message in MIME format.\r\n",
              epilogue: bytes = b"", close: bool = True) -> bytes:
    b = boundary.encode()
    out = head + f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode() + preamble
    for p in parts:
        out += b"--" + b + b"\r\n" + p + b"\r\n"
    if close:
        out += b"--" + b + b"--\r\n" + epilogue
    return out


def nested(inner_parts: list[bytes], boundary: str = "=_inner_", subtype: str = "mixed") -> bytes:
    """A multipart part to put inside another multipart."""
    b = boundary.encode()
    out = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()
    for p in inner_parts:
        out += b"--" + b + b"\r\n" + p + b"\r\n"
    return out + b"--" + b + b"--"


def rfc822(message: bytes, encoding: str | None = None) -> bytes:
    h = b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n"
    if encoding == "base64":
        return h + b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(message).rstrip(b"\r\n")
    return h + b"\r\n" + message.rstrip(b"\r\n")


# --- executables and images ----------------------------------------------------------------
def pe() -> bytes:
    dos = bytearray(b"MZ" + b"\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + b"\x00" * 50)
    struct.pack_into("<I", dos, 0x3C, 0x80)
    dos += b"\x00" * (0x80 - len(dos))
    return bytes(dos) + b"PE\x00\x00" + b"\x4c\x01\x03\x00" + b"\x00" * 200


def elf() -> bytes:
    return b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + b"\x02\x00\x3e\x00" + b"\x00" * 100


def macho(magic: bytes = b"\xcf\xfa\xed\xfe") -> bytes:
    return magic + b"\x07\x00\x00\x01" + b"\x00" * 100


def macho_fat() -> bytes:
    return b"\xca\xfe\xba\xbe\x00\x00\x00\x02" + b"\x00" * 100


def java_class() -> bytes:
    return b"\xca\xfe\xba\xbe\x00\x00\x00\x34" + b"\x00" * 100


def dex() -> bytes:
    return b"dex\n035\x00" + b"\x00" * 100


def script(line: bytes = b"#!/bin/sh") -> bytes:
    return line + b"\nrm -rf ~\n"


def lnk() -> bytes:
    return bytes.fromhex("4c0000000114020000000000c000000000000046") + b"\x00" * 56


def iso() -> bytes:
    data = bytearray(0x9000)
    data[0x8000:0x8006] = b"\x01CD001"
    return bytes(data)


def udf() -> bytes:
    data = bytearray(0x9800)
    data[0x8000:0x8006] = b"\x00BEA01"
    data[0x8800:0x8806] = b"\x00NSR02"
    return bytes(data)


def vhd_fixed() -> bytes:
    return b"\x00" * 4096 + b"conectix" + b"\x00" * 504


def vhdx() -> bytes:
    return b"vhdxfile" + b"\x00" * 100


def dmg() -> bytes:
    return b"\x00" * 4096 + b"koly" + b"\x00" * 508


def fat_image() -> bytes:
    data = bytearray(1024)
    data[0:3] = b"\xeb\x3c\x90"
    data[0x36:0x3E] = b"FAT12   "
    data[510:512] = b"\x55\xaa"
    return bytes(data)


def chm() -> bytes:
    return b"ITSF\x03\x00\x00\x00" + b"\x00" * 100


# --- archives ------------------------------------------------------------------------------
def zip_of(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def encrypted_zip(files: dict[str, bytes]) -> bytes:
    """A zip whose entries are marked encrypted (flag bit 0, as ZipCrypto/AES archives are)."""
    data = bytearray(zip_of(files, zipfile.ZIP_STORED))
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.find(sig)
        while pos >= 0:
            data[pos + flag_at] |= 0x01
            pos = data.find(sig, pos + 4)
    return bytes(data)


def zip_lying_names(central: str, local: str, payload: bytes = b"hello") -> bytes:
    """The central directory says one name, the local header another (same length)."""
    assert len(central) == len(local)
    data = bytearray(zip_of({local: payload}, zipfile.ZIP_STORED))
    pos = data.find(b"PK\x01\x02")
    data[pos + 46:pos + 46 + len(central)] = central.encode()
    return bytes(data)


def zip_bomb(size: int = 50 * 1024 * 1024) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("zeros.txt", "w", force_zip64=True) as f:
            chunk = b"\x00" * (1024 * 1024)
            for _ in range(size // len(chunk)):
                f.write(chunk)
    return buf.getvalue()


def nested_zip(depth: int, inner: dict[str, bytes]) -> bytes:
    data = zip_of(inner)
    for n in range(depth - 1):
        data = zip_of({f"level{depth - n - 1}.zip": data})
    return data


def tar_of(files: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gzip_of(data: bytes, name: str | None = None) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename=name or "", mode="wb", fileobj=buf, mtime=0) as g:
        g.write(data)
    return buf.getvalue()


def bz2_of(data: bytes) -> bytes:
    return bz2.compress(data)


def xz_of(data: bytes) -> bytes:
    return lzma.compress(data)


def rar() -> bytes:
    return b"Rar!\x1a\x07\x01\x00" + b"\x00" * 64


def seven_zip() -> bytes:
    return b"7z\xbc\xaf\x27\x1c\x00\x04" + b"\x00" * 64


# --- OLE2 compound files -------------------------------------------------------------------
ENDOFCHAIN, FREESECT, FATSECT, NOSTREAM = 0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFFFD, 0xFFFFFFFF
MSI_CLSID = "000C1084-0000-0000-C000-000000000046"


def ole(entries: dict[str, bytes | None], clsid: str | None = None) -> bytes:
    """A minimal compound file: ``{"Macros/VBA/dir": b"...", "WordDocument": b"..."}``.

    Paths with "/" make storages (None as a value: an empty storage). Streams are padded to
    4096 bytes so that all live in regular sectors (no mini stream)."""
    tree: dict = {}
    for path, data in entries.items():
        node = tree
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = {} if data is None else data
    dirs: list[dict] = []
    sectors: list[bytes] = []

    def add(name: str, value) -> int:
        idx = len(dirs)
        entry = {"name": name, "child": NOSTREAM, "right": NOSTREAM}
        dirs.append(entry)
        if isinstance(value, dict):
            entry.update(type=1, start=0, size=0)
            kids = [add(k, v) for k, v in value.items()]
            for a, b in zip(kids, kids[1:]):
                dirs[a]["right"] = b
            entry["child"] = kids[0] if kids else NOSTREAM
        else:
            data = value + b"\x00" * max(0, 4096 - len(value))
            data += b"\x00" * (-len(data) % 512)
            entry.update(type=2, start=len(sectors), size=len(data))
            sectors.extend(data[i:i + 512] for i in range(0, len(data), 512))
        return idx

    root = {"name": "Root Entry", "child": NOSTREAM, "right": NOSTREAM, "type": 5,
            "start": ENDOFCHAIN, "size": 0}
    dirs.append(root)
    kids = [add(k, v) for k, v in tree.items()]
    for a, b in zip(kids, kids[1:]):
        dirs[a]["right"] = b
    root["child"] = kids[0] if kids else NOSTREAM
    # chains for streams
    fat: list[int] = []
    streams = [d for d in dirs if d["type"] == 2]
    fat = [FREESECT] * len(sectors)
    for d in streams:
        n = d["size"] // 512
        for i in range(n):
            fat[d["start"] + i] = d["start"] + i + 1 if i < n - 1 else ENDOFCHAIN
    dir_bytes = b"".join(_dir_entry(d, clsid if d is root else None) for d in dirs)
    dir_bytes += b"\x00" * (-len(dir_bytes) % 512)
    dir_start = len(sectors)
    n_dir = len(dir_bytes) // 512
    sectors.extend(dir_bytes[i:i + 512] for i in range(0, len(dir_bytes), 512))
    fat += [dir_start + i + 1 if i < n_dir - 1 else ENDOFCHAIN for i in range(n_dir)]
    n_fat = 1
    while (len(fat) + n_fat) > n_fat * 128:
        n_fat += 1
    fat_start = len(sectors)
    fat += [FATSECT] * n_fat
    fat += [FREESECT] * (n_fat * 128 - len(fat))
    fat_bytes = struct.pack(f"<{len(fat)}I", *fat)
    sectors.extend(fat_bytes[i:i + 512] for i in range(0, len(fat_bytes), 512))
    difat = [fat_start + i for i in range(n_fat)] + [FREESECT] * (109 - n_fat)
    header = (bytes.fromhex("d0cf11e0a1b11ae1") + b"\x00" * 16
              + struct.pack("<HHHHH", 0x3E, 3, 0xFFFE, 9, 6) + b"\x00" * 6
              + struct.pack("<IIIIIIIII", 0, n_fat, dir_start, 0, 4096, ENDOFCHAIN, 0, ENDOFCHAIN, 0)
              + struct.pack("<109I", *difat))
    return header + b"".join(sectors)


def _dir_entry(d: dict, clsid: str | None) -> bytes:
    name = d["name"].encode("utf-16-le") + b"\x00\x00"
    raw_clsid = b"\x00" * 16
    if clsid:
        import uuid
        raw_clsid = uuid.UUID(clsid).bytes_le
    return (name.ljust(64, b"\x00") + struct.pack("<HBB", len(name), d["type"], 1)
            + struct.pack("<III", NOSTREAM, d["right"], d["child"]) + raw_clsid
            + struct.pack("<I", 0) + b"\x00" * 16
            + struct.pack("<IQ", d["start"], d["size"]))


def ole10native(filename: str, payload: bytes) -> bytes:
    label = filename.encode("cp1252") + b"\x00"
    path = ("C:\\Users\\x\\" + filename).encode("cp1252") + b"\x00"
    body = (b"\x02\x00" + label + path + b"\x00\x00\x03\x00" + struct.pack("<I", len(path)) + path
            + struct.pack("<I", len(payload)) + payload)
    return struct.pack("<I", len(body)) + body


def xls_with_xlm() -> bytes:
    bof = struct.pack("<HH", 0x0809, 16) + b"\x00\x06\x05\x00" + b"\x00" * 12
    sheet = struct.pack("<HH", 0x0085, 10) + struct.pack("<I", 0) + b"\x00\x01" + b"\x02\x00" + b"M1"
    eof = struct.pack("<HH", 0x000A, 0)
    return ole({"Workbook": bof + sheet + eof})


# --- TNEF ------------------------------------------------------------------------------------
def tnef(filename: str, payload: bytes) -> bytes:
    def attr(level: int, ident: int, data: bytes) -> bytes:
        return (bytes([level]) + struct.pack("<II", ident, len(data)) + data
                + struct.pack("<H", sum(data) & 0xFFFF))
    out = struct.pack("<IH", 0x223E9F78, 1)
    out += attr(1, 0x00089006, b"\x00\x00\x01\x00")
    out += attr(2, 0x00069002, b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 8)
    out += attr(2, 0x00018010, filename.encode("cp1252") + b"\x00")
    out += attr(2, 0x0006800F, payload)
    return out


def deflate_raw(data: bytes) -> bytes:
    return zlib.compress(data)
