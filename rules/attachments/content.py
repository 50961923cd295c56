"""What a file is by its bytes (magic numbers), and what Office (OLE2) and TNEF containers hold.

``sniff`` looks only at the first ``HEAD`` bytes and, for formats that keep their signature at
the end (fixed VHD, DMG), the last 512. OLE2 files are read with olefile (the standard OLE2
parser in Python, the one oletools builds on); without it they count as uninspectable.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

try:  # olefile is a dependency of smtpgate; a bare plugin install may lack it
    import olefile
except ImportError:  # pragma: no cover - exercised only without the dependency
    olefile = None

HEAD = 40 * 1024  # enough for ISO 9660 / UDF volume descriptors at 0x8001..0x9006
_ISO_DESCRIPTORS = (0x8001, 0x8801, 0x9001)
#: What ``sniff`` looks for in a footer (fixed VHD, DMG): (offset from the end, signature).
#: The scanner proves base64 free of them from its characters (``scan._FOOTER_QUANTA``).
FOOTER_SIGNATURES = ((-512, b"conectix"), (-511, b"conectix"), (-512, b"koly"))
#: Every (start, stop) that ``sniff`` reads of data not starting with "MZ" (a PE header may
#: be anywhere): the first 512 bytes, the footer signatures' bytes (the 9 at 512 from the
#: end) and the ISO/UDF descriptors. A test holds sniff to it; the scanner relies on it to
#: sniff base64 without decoding all of it (the fewer bytes, the fewer it decodes).
SNIFF_WINDOWS = ((0, 512), (min(o for o, _ in FOOTER_SIGNATURES),
                            max(o + len(sig) for o, sig in FOOTER_SIGNATURES))) + \
    tuple((o, o + 5) for o in _ISO_DESCRIPTORS)

#: kinds that are banned by content (``banned_content``), with how the reason reads
DESCRIPTIONS = {
    "pe": "a Windows executable (PE/MZ)",
    "elf": "a Linux/Unix executable (ELF)",
    "macho": "a macOS executable (Mach-O)",
    "script": "a script (#! line)",
    "java": "Java/Android code (class, JAR or DEX)",
    "lnk": "a Windows shortcut (LNK)",
    "disk_image": "a disk image (ISO/UDF/VHD/VHDX/DMG/FAT/NTFS)",
    "msi": "a Windows installer (MSI/MSP/MST)",
    "chm": "a compiled HTML help file (CHM)",
}
CONTAINERS = ("zip", "tar", "gzip", "bzip2", "xz", "ole", "tnef")
OPAQUE = {  # archive formats the rule cannot list without outside tools
    "rar": "RAR", "7z": "7-Zip", "cab": "CAB", "ace": "ACE", "arj": "ARJ", "lzh": "LHA/LZH",
    "zstd": "Zstandard", "xar": "XAR", "sit": "StuffIt",
}

_MACHO = {b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe"}
_LNK = bytes.fromhex("4c0000000114020000000000c000000000000046")
_OLE = bytes.fromhex("d0cf11e0a1b11ae1")
_TNEF = b"\x78\x9f\x3e\x22"
_MSI_CLSIDS = {"000C1084-0000-0000-C000-000000000046", "000C1086-0000-0000-C000-000000000046",
               "000C1082-0000-0000-C000-000000000046"}


def sniff(data: bytes, scripts: bool = True) -> str | None:
    """The kind of file ``data`` starts (or, for some images, ends) as; None if nothing known."""
    # A new signature at the start needs its first byte in _LEADS (else it is never tried),
    # and a sample in the tests' samples_of_every_kind (which checks _LEADS against all bytes).
    h = data[:16]
    if h[:1] not in _LEADS:  # no signature at the start can match: only those further in
        return _sniff_inside(data)
    if h[:2] == b"MZ" and _looks_mz(data):
        return "pe"
    if h[:4] == b"\x7fELF":
        return "elf"
    if h[:4] in _MACHO:
        return "macho"
    if h[:4] in (b"\xca\xfe\xba\xbe", b"\xca\xfe\xba\xbf"):
        # Java class files and fat Mach-O binaries share the magic: a class file has its
        # version (>= 45) where a fat binary has its (small) count of architectures.
        n = int.from_bytes(data[4:8], "big")
        return "macho" if h[3] == 0xBF or n < 40 else "java"
    if h[:4] == b"dex\n":
        return "java"
    if scripts and h[:2] == b"#!" and _shebang(data):
        return "script"
    if h[:20] == _LNK[:20] or (h[:4] == b"\x4c\x00\x00\x00" and data[4:20] == _LNK[4:20]):
        return "lnk"
    if h[:8] == _OLE:
        return "ole"
    if h[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if h[:4] == b"ITSF":
        return "chm"
    if h[:8] == b"vhdxfile" or h[:8] == b"conectix":
        return "disk_image"
    if _disk_image_inside(data):
        return "disk_image"
    if h[:4] == _TNEF:
        return "tnef"
    if h[:2] == b"\x1f\x8b":
        return "gzip"
    if h[:3] == b"BZh" and h[3:4].isdigit():
        return "bzip2"
    if h[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if data[257:262] == b"ustar":
        return "tar"
    if h[:7] == b"Rar!\x1a\x07\x00" or h[:8] == b"Rar!\x1a\x07\x01\x00":
        return "rar"
    if h[:6] == b"7z\xbc\xaf\x27\x1c":
        return "7z"
    if h[:4] == b"MSCF":
        return "cab"
    if data[7:14] == b"**ACE**":
        return "ace"
    if h[:2] == b"\x60\xea" and 0 < int.from_bytes(data[2:4], "little") <= 2600:
        return "arj"
    if _lzh(data):
        return "lzh"
    if h[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if h[:4] == b"xar!":
        return "xar"
    if h[:8] == b"StuffIt " or h[:4] == b"SIT!":
        return "sit"
    return None


#: The first byte of every signature ``sniff`` looks for at the start of the data: data
#: starting otherwise can only be one of those found further in (``_sniff_inside``). Kept by
#: hand (the signatures are code, not a table): a test sniffs a sample of each both ways.
_LEADS = frozenset(bytes([b]) for b in b"M\x7f\xfe\xce\xcf\xcadL#\xd0PIvc\x78\x1fB\xfdR7\x60\x28xS")


def _sniff_inside(data: bytes) -> str | None:
    """What ``sniff`` says of data whose first byte starts no signature: its checks of bytes
    further in, in its order."""
    if _disk_image_inside(data):
        return "disk_image"
    if data[257:262] == b"ustar":
        return "tar"
    if data[7:14] == b"**ACE**":
        return "ace"
    if _lzh(data):
        return "lzh"
    return None


_ISO_FIRST = min(_ISO_DESCRIPTORS)
_ISO_IDS = (b"CD001", b"BEA01", b"NSR02", b"NSR03", b"TEA01")
#: FOOTER_SIGNATURES as (where to slice, signature), built once
_FOOTERS = tuple((slice(o, o + len(sig)), sig) for o, sig in FOOTER_SIGNATURES)
if any(o + len(sig) >= 0 for o, sig in FOOTER_SIGNATURES):  # (the slice would end at 0: empty)
    raise AssertionError("a footer signature must end before the data's last byte")


def _disk_image_inside(data: bytes) -> bool:
    """ISO/UDF volume descriptors, a VHD or DMG footer, a FAT/NTFS boot sector."""
    size = len(data)
    if size > _ISO_FIRST:  # (shorter data has no byte at any descriptor: skip them)
        for off in _ISO_DESCRIPTORS:
            if data[off:off + 5] in _ISO_IDS:
                return True
    if size >= 512:
        for where, sig in _FOOTERS:
            if data[where] == sig:
                return True
    return data[510:512] == b"\x55\xaa" and (data[3:11] == b"NTFS    " or data[0x36:0x39] == b"FAT"
                                             or data[0x52:0x57] == b"FAT32" or data[3:11] == b"EXFAT   ")


def _lzh(data: bytes) -> bool:
    return data[2:5] in (b"-lh", b"-lz") and data[6:7] == b"-"


def _looks_mz(data: bytes) -> bool:
    """"MZ" starts plenty of text too: want the PE header, or a binary DOS header."""
    if len(data) >= 64:
        off = int.from_bytes(data[0x3C:0x40], "little")
        if 64 <= off <= len(data) - 4 and data[off:off + 4] == b"PE\x00\x00":
            return True
        return b"\x00" in data[2:64]
    return len(data) >= 28 and b"\x00" in data[2:28]


def _shebang(data: bytes) -> bool:
    line = data[2:256].split(b"\n", 1)[0].strip()
    return line[:1] == b"/" or line.startswith((b"usr/", b"bin/", b"env "))


# --- OLE2 (Office 97-2003, MSI, Outlook .msg) ------------------------------------------
@dataclass
class OleReport:
    kinds: set[str] = field(default_factory=set)   # "macros", "msi", "encrypted"
    embedded: list[tuple[str, bytes]] = field(default_factory=list)  # (file name, bytes)
    names: list[str] = field(default_factory=list)
    error: str | None = None


def inspect_ole(data: bytes, max_streams: int = 500, max_read: int = 16 * 1024 * 1024) -> OleReport:
    report = OleReport()
    if olefile is None:
        report.error = "olefile is not installed"
        return report
    try:
        ole = olefile.OleFileIO(io.BytesIO(data))
    except Exception as e:  # olefile raises many kinds on hostile input
        report.error = f"unreadable OLE2 file ({type(e).__name__})"
        return report
    try:
        if (ole.root.clsid or "").upper() in _MSI_CLSIDS:
            report.kinds.add("msi")
        entries = ole.listdir(streams=True, storages=True)[:max_streams]
        lowered = [[p.lower() for p in path] for path in entries]
        joined = {"/".join(p) for p in lowered}
        for path in lowered:
            if path[-1] in ("_vba_project", "vba_project") or (
                    len(path) >= 2 and path[-2] == "vba" and path[-1] == "dir"):
                report.kinds.add("macros")
        if "encryptedpackage" in joined or "encryptioninfo" in joined:
            report.kinds.add("encrypted")
        budget = max_read
        for path in entries:
            if ole.get_type(path) != olefile.STGTY_STREAM:
                continue
            size = ole.get_size(path)
            name = path[-1].lower()
            if name == "\x01ole10native" and size <= budget:
                budget -= size
                found = parse_ole10native(ole.openstream(path).read())
                if found:
                    report.names.extend(found[0])
                    report.embedded.append((found[0][0] if found[0] else "", found[1]))
            elif name in ("workbook", "book") and size <= budget:
                budget -= size
                if _xlm_macro_sheet(ole.openstream(path).read()):
                    report.kinds.add("macros")
            elif size >= 64:
                head = ole.openstream(path).read(HEAD)
                if sniff(head, scripts=False) in ("pe", "elf", "macho"):
                    report.embedded.append((path[-1], head))
    except Exception as e:
        report.error = f"unreadable OLE2 file ({type(e).__name__})"
    finally:
        try:
            ole.close()
        except Exception:
            pass
    return report


def parse_ole10native(data: bytes) -> tuple[list[str], bytes] | None:
    """An embedded "Package" object: its label, file name, temp path and the file's bytes."""
    try:
        pos = 6  # total size (4), flags (2)
        names = []
        for _ in range(3):  # label, original path, then (after 8 bytes) the temp path
            end = data.index(b"\x00", pos, pos + 4096)
            names.append(data[pos:end].decode("cp1252", "replace"))
            pos = end + 1
            if len(names) == 2:
                pos += 8
        size = struct.unpack_from("<I", data, pos)[0]
        payload = data[pos + 4:pos + 4 + size]
    except (ValueError, struct.error):
        return None
    return [n for n in (names[1], names[0], names[2]) if n], payload


def _xlm_macro_sheet(stream: bytes) -> bool:
    """Excel 4.0 (XLM) macro sheets: a BoundSheet8 record (0x85) of sheet type 1."""
    pos, n = 0, len(stream)
    while pos + 4 <= n:
        rtype, rlen = struct.unpack_from("<HH", stream, pos)
        if rtype == 0x0085 and rlen >= 6 and pos + 10 <= n and stream[pos + 9] == 1:
            return True
        if rtype == 0x000A:  # EOF of the workbook globals: sheets are all declared before it
            return False
        pos += 4 + rlen
    return False


# --- TNEF (winmail.dat) ----------------------------------------------------------------
def parse_tnef(data: bytes, max_attrs: int = 10_000) -> tuple[list[tuple[list[str], bytes]], str | None]:
    """The attachments a TNEF stream carries: ([names], bytes) each; and an error, if any."""
    attachments: list[tuple[list[str], bytes]] = []
    names: list[str] = []
    payload = b""
    pos, n = 6, len(data)
    try:
        for _ in range(max_attrs):
            if pos + 9 > n:
                break
            level = data[pos]
            attr, length = struct.unpack_from("<II", data, pos + 1)
            value = data[pos + 9:pos + 9 + length]
            if len(value) < length:
                return attachments + ([(names, payload)] if names or payload else []), "truncated TNEF"
            pos += 9 + length + 2
            if level != 2:
                continue
            if attr == 0x00069002:  # attAttachRendData: a new attachment starts
                if names or payload:
                    attachments.append((names, payload))
                names, payload = [], b""
            elif attr == 0x00018010:  # attAttachTitle
                names.append(value.split(b"\x00", 1)[0].decode("cp1252", "replace"))
            elif attr == 0x0006800F:  # attAttachData
                payload = value
            elif attr == 0x00069005:  # attAttachment: MAPI properties
                names.extend(_mapi_names(value))
        else:
            return attachments, "too many TNEF attributes"
    except struct.error:
        return attachments, "broken TNEF"
    if names or payload:
        attachments.append((names, payload))
    return attachments, None


def _mapi_names(blob: bytes) -> list[str]:
    """PR_ATTACH_LONG_FILENAME (0x3707) and PR_ATTACH_FILENAME (0x3704), string8 or unicode."""
    out = []
    for prop in (0x3707, 0x3704, 0x3703):
        for ptype, enc in ((0x001F, "utf-16-le"), (0x001E, "cp1252")):
            tag = struct.pack("<HH", ptype, prop)
            i = blob.find(tag)
            if i >= 0 and i + 12 <= len(blob):
                length = struct.unpack_from("<I", blob, i + 8)[0]
                raw = blob[i + 12:i + 12 + min(length, 2048)]
                out.append(raw.decode(enc, "replace").split("\x00", 1)[0])
    return [n for n in out if n]
