"""attachments: find banned parts (by file name, declared type, content, inside archives) and
strip, reject or quarantine them. See docs/rules/attachments.md.

Only the public API is used. ``strip`` splices the original bytes: every byte outside a
banned part (other parts, headers, boundaries, preamble) stays exactly as it was.
"""
from __future__ import annotations

import binascii

from smtpgate import (Option, OptionError, Rule, Verdict, boolean, integer, list_of,
                      number, one_of, size, string)

from .mime import Limits, Part
from .scan import Finding, Settings, scan

DEFAULT_EXTENSIONS = [
    # Windows programs, installers and libraries
    "exe", "com", "scr", "pif", "cpl", "dll", "ocx", "sys", "drv", "msi", "msp", "mst", "msix",
    "msixbundle", "appx", "appxbundle", "appinstaller", "application", "gadget", "xll", "xbap",
    "ex_", "lib", "mui", "diagcab", "diagcfg", "diagpkg", "cab",
    # scripts and things Windows runs as scripts
    "bat", "cmd", "vb", "vbs", "vbe", "js", "jse", "wsf", "wsh", "wsc", "ws", "sct", "hta",
    "ps1", "ps1xml", "ps2", "ps2xml", "psc1", "psc2", "psd1", "psm1", "msh", "msh1", "msh2",
    "mshxml", "msh1xml", "msh2xml", "scf", "shb", "shs", "inf", "ins", "isp", "reg", "url",
    "website", "settingcontent-ms", "library-ms", "search-ms", "searchconnector-ms", "mof",
    "hlp", "chm", "mmc", "msc", "jnlp", "jar", "class", "py", "pyw", "pl", "sh", "csh", "ksh",
    "command", "tool", "mjs",
    # shortcuts, disk images and other containers Windows mounts or opens directly
    "lnk", "iso", "img", "vhd", "vhdx", "udf", "dmg", "wim",
    # Office add-ins and macro-enabled formats
    "docm", "dotm", "xlsm", "xltm", "xlam", "xla", "pptm", "potm", "ppam", "ppsm", "sldm",
    "ppa", "mde", "mda", "ade", "adp", "accde", "mam", "maq", "mar", "mas", "mat", "mau",
    "mav", "maw",
    # other operating systems' packages and programs
    "app", "apk", "dex", "deb", "rpm", "elf", "run", "kext", "pkg", "mpkg", "action",
    "workflow", "terminal",
    # old archive formats nothing can look into here (rar, 7z: see opaque archives)
    "ace", "arj", "lha", "lzh",
]
DEFAULT_TYPES = [
    "application/x-msdownload", "application/x-msdos-program", "application/x-ms-dos-executable",
    "application/x-dosexec", "application/x-executable", "application/x-winexe",
    "application/vnd.microsoft.portable-executable", "application/x-ms-installer",
    "application/x-msi", "application/x-ms-shortcut", "application/hta", "application/x-sh",
    "application/x-csh", "application/x-shellscript", "application/x-bat",
    "application/java-archive", "application/x-java-archive", "application/x-java-applet",
    "application/x-iso9660-image", "application/x-apple-diskimage", "application/x-elf",
    "application/x-mach-binary", "application/vnd.android.package-archive",
    "message/partial",
]
CONTENT_KINDS = ("pe", "elf", "macho", "script", "java", "lnk", "disk_image", "msi", "chm")
DEFAULT_NOTE = ("This part of the message was removed by the mail gateway.\n"
                "File: {filename}\nReason: {reason}\n")
_CONTENT_FIELDS = ("content-type", "content-transfer-encoding", "content-disposition")
_BLOCK = one_of("block", "allow")


def _extension(value) -> str:
    text = string(value).strip().lower().lstrip(".")
    if not text or any(c in text for c in "/\\ "):
        raise ValueError(f"expected a file extension like \"exe\", got {value!r}")
    return text


def _mime_type(value) -> str:
    text = string(value).strip().lower()
    if text.count("/") != 1 or " " in text:
        raise ValueError(f"expected a MIME type like \"application/x-msdownload\", got {value!r}")
    return text


def _template(value) -> str:
    text = string(value)
    try:
        text.format(filename="", reason="", type="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"bad template (placeholders: {{filename}}, {{reason}}, {{type}}): {e}") from None
    return text


class Attachments(Rule):
    """Banned attachments: strip them, reject the message, or quarantine it."""

    name = "attachments"
    action = Option(one_of("strip", "reject", "quarantine"), "reject",
                    "what to do with a message holding a banned part")
    quarantine_reply = Option(one_of("reject", "deliver"), "reject",
                              "with action: quarantine, answer 554 5.7.1, or deliver the stripped copy")
    banned_extensions = Option(list_of(_extension), DEFAULT_EXTENSIONS, "file extensions banned by name")
    extra_extensions = Option(list_of(_extension), [], "banned in addition to banned_extensions")
    allowed_extensions = Option(list_of(_extension), [], "never banned by name (content still counts)")
    banned_types = Option(list_of(_mime_type), DEFAULT_TYPES, "declared MIME types banned (type/* allowed)")
    banned_content = Option(list_of(one_of(*CONTENT_KINDS)), list(CONTENT_KINDS),
                            "kinds of content banned whatever the name says")
    bidi_names = Option(_BLOCK, "block", "file names holding bidi controls (U+202E...)")
    encrypted = Option(_BLOCK, "block", "encrypted archive entries and encrypted Office files")
    macros = Option(_BLOCK, "block", "Office documents with VBA or Excel 4.0 macros")
    uninspectable = Option(_BLOCK, "block",
                           "archives that cannot be listed (rar, 7z, corrupt, too deep, over limits)")
    archive_depth = Option(integer, 3, "how many levels of archives inside archives are opened")
    archive_max_entries = Option(integer, 10000, "entries listed per message, all archives together")
    archive_max_size = Option(size, "100MB", "bytes unpacked per message, all archives together")
    archive_max_ratio = Option(number, 100, "largest unpacked/packed ratio (past 1 MB unpacked)")
    max_parts = Option(integer, 1000, "MIME parts per message before it counts as malformed")
    max_depth = Option(integer, 30, "MIME nesting depth before it counts as malformed")
    max_header_size = Option(size, "256KB", "one part's header block before it counts as malformed")
    on_malformed = Option(one_of("reject", "tempfail", "quarantine", "accept"), "reject",
                          "when the MIME structure cannot be trusted")
    note = Option(_template, DEFAULT_NOTE, "text of the part that replaces a stripped one")
    reject_text = Option(_template, "Message refused: attachment {filename} not allowed ({reason})",
                         "what the client reads on reject")
    quarantine_text = Option(_template, "Message held for review: attachment {filename} ({reason})",
                             "what the client reads on quarantine")
    log_defects = Option(boolean, False, "log harmless MIME defects (missing closing boundary...)")

    def setup(self):
        for key in ("archive_depth", "archive_max_entries", "max_parts", "max_depth"):
            if getattr(self, key) < 0:
                raise OptionError(key, "must not be negative")
        exts = (set(self.banned_extensions) | set(self.extra_extensions)) - set(self.allowed_extensions)
        self._settings = Settings(
            extensions=frozenset(exts), allowed_extensions=frozenset(self.allowed_extensions),
            types=tuple(self.banned_types), content=frozenset(self.banned_content),
            block_bidi=self.bidi_names == "block", block_encrypted=self.encrypted == "block",
            block_macros=self.macros == "block", block_uninspectable=self.uninspectable == "block",
            archive_depth=self.archive_depth, archive_max_entries=self.archive_max_entries,
            archive_max_size=self.archive_max_size, archive_max_ratio=self.archive_max_ratio,
            limits=Limits(self.max_depth, self.max_parts, self.max_header_size))

    async def on_data(self, tx):
        raw = tx.message.raw
        report = scan(raw, self._settings)
        if report.defects and self.log_defects:
            self.log.info("tx %s: MIME defects: %s", tx.id, "; ".join(report.defects[:10]))
        if report.untrusted and self.on_malformed != "accept":
            return self._malformed(report)
        if not report.findings:
            return None
        first = report.findings[0]
        name = first.name or "(unnamed part)"
        reason = _summary(report.findings)
        tx.results.add(self, fail=f"banned: {reason}")
        tx.results.event(self, "banned_attachment", why=reason)  # for the sender state machines
        if self.action == "reject":
            return Verdict.reject(_reply_text(self.reject_text, name, first), 554, "5.7.1",
                                  reason=f"banned: {reason}")
        held = self.action == "quarantine"
        if held and self.quarantine_reply == "reject":
            return Verdict.quarantine(_reply_text(self.quarantine_text, name, first), 554, "5.7.1",
                                      reason=f"banned: {reason}")
        edits = None if report.untrusted else self._strip(raw, report.findings)
        if edits is None:  # cannot cut the part out cleanly: refuse rather than pass it on
            if held:
                return Verdict.quarantine(_reply_text(self.quarantine_text, name, first), 554,
                                          "5.7.1", reason=f"banned (could not strip): {reason}")
            return Verdict.reject(_reply_text(self.reject_text, name, first), 554, "5.7.1",
                                  reason=f"banned (could not strip): {reason}")
        tx.message.replace_ranges(edits, f"attachments: stripped {reason}")
        if held:
            tx.message.quarantine_original(f"banned: {reason}")
        tx.results.add(self, msg=_clip(f"stripped {reason}"), data={"stripped": [f.name for f in report.findings]})
        return None

    def _malformed(self, report):
        why = "malformed MIME: " + "; ".join(dict.fromkeys(report.untrusted))
        if report.findings:
            why += "; also banned: " + _summary(report.findings)
        why = _clip(why)
        if self.on_malformed == "tempfail":
            return Verdict.tempfail("Message structure cannot be checked, try again later", 451,
                                    "4.7.1", reason=why)
        if self.on_malformed == "quarantine":
            return Verdict.quarantine("Message held for review: its MIME structure cannot be checked",
                                      554, "5.7.1", reason=why)
        return Verdict.reject("Message refused: its MIME structure cannot be checked", 554,
                              "5.6.0", reason=why)

    # --- strip ------------------------------------------------------------------------------
    def _strip(self, raw: bytes, findings: list[Finding]) -> list[tuple[int, int, bytes]] | None:
        targets: dict[tuple[int, int], tuple[Part | None, Finding]] = {}
        for f in findings:
            if f.gap is not None and f.part.spliceable and f.part.buf is raw:
                targets.setdefault(f.gap, (None, f))
                continue
            part = f.part
            while part is not None and not part.spliceable:
                part = part.parent
            if part is None or part.buf is not raw:
                return None
            targets.setdefault((part.start, part.end), (part, f))
        keep, reach = [], -1  # outermost spans only: a part inside a replaced one goes with it
        for span in sorted(targets, key=lambda s: (s[0], -s[1])):
            if span[1] <= reach:
                continue
            keep.append(span)
            reach = max(reach, span[1])
        edits: list[tuple[int, int, bytes]] = []
        for span in keep:
            part, finding = targets[span]
            if part is None:
                edits.append((span[0], span[1], b""))  # a preamble/epilogue: readers ignore it
            else:
                edits.extend(self._replace(raw, part, finding))
        edits.sort()
        if any(a[1] > b[0] for a, b in zip(edits, edits[1:])):
            return None
        return edits

    def _replace(self, raw: bytes, part: Part, finding: Finding) -> list[tuple[int, int, bytes]]:
        text = self.note.format(filename=finding.name or "(unnamed part)",
                                reason="; ".join(finding.reasons), type=part.ctype)
        lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
        if all(ord(c) < 128 for c in text):
            cte, body = "7bit", "\r\n".join(lines).encode("ascii")
        else:
            cte = "quoted-printable"
            body = b"\r\n".join(binascii.b2a_qp(x.encode("utf-8")).replace(b"\n", b"=\r\n")
                                for x in lines)
        headers = (b"Content-Type: text/plain; charset=utf-8\r\nContent-Disposition: inline\r\n"
                   b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n")
        if not part.message_level:
            return [(part.start, part.end, headers + b"\r\n" + body)]
        # The message itself (or one inside message/rfc822): keep From, Subject & co.
        content = [f for f in part.fields if f.name in _CONTENT_FIELDS]
        last = part.fields[-1].end if part.fields else part.start
        edits = [(f.start, f.end, headers if n == 0 else b"") for n, f in enumerate(content)]
        if not content:
            edits.append((last, last, headers))
        edits.append((last, part.end, b"\r\n" + body))
        return edits


def _summary(findings: list[Finding]) -> str:
    parts = []
    for f in findings[:5]:
        label = f.name or ("preamble/epilogue" if f.gap else f"part {f.part.path or 'top'}")
        parts.append(f"{label} ({'; '.join(f.reasons[:3])})")
    more = f" and {len(findings) - 5} more" if len(findings) > 5 else ""
    return _clip(", ".join(parts) + more)


def _clip(text: str, limit: int = 900) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reply_text(template: str, name: str, finding: Finding) -> str:
    """One line of printable ASCII (SMTP replies are ASCII; file names are not)."""
    reason = finding.reasons[0] if finding.reasons else "banned"
    text = template.format(filename=_ascii(name, 60), reason=_ascii(reason, 120),
                           type=_ascii(finding.part.ctype, 60))
    return _ascii(text, 400)


def _ascii(text: str, limit: int) -> str:
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
