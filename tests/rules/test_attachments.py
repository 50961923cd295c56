"""The attachments rule through smtpgate.testing: what it bans (names, types, contents,
archives, Office, TNEF, forwarded messages), its actions, its options, and the corpus."""
from __future__ import annotations

import sys

import pytest

from tests.support import attachment_samples as S
from tests.support.constants import CORPUS

from smtpgate import OptionError, Verdict  # noqa: E402
from smtpgate.testing import Harness, run_rule  # noqa: E402
from smtpgate_rules.attachments import Attachments  # noqa: E402



async def verdict_of(raw: bytes, **options):
    """(reply code, the rule's reason) for one message."""
    result = await run_rule(Attachments, options, raw)
    entries = [e for e in result.trace if e.rule == "attachments"]
    return result.reply.code, (entries[0].reason or "") if entries else ""


def with_attachment(data: bytes, name="file.bin", **kw) -> bytes:
    return S.multipart(S.text_part(), S.part(data, name, **kw))


# --- by name -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "setup.exe", "SETUP.EXE", "invoice.pdf.exe", "invoice.pdf.exe.", "invoice.pdf.exe  ",
    "run.js", "x.vbs", "x.scr", "x.lnk", "x.iso", "x.img", "x.vhd", "x.hta", "x.ps1", "x.docm",
    "x.jar", "x.msi", "x.cmd", "x.bat", "x.reg", "x.chm", "x.apk", "x.ace",
    "invoice\u202egpj.exe", "readme.e\u200bxe", "x.{3050F4D8-98B5-11CF-BB82-00AA00BDCE0B}",
])
async def test_banned_by_name(name):
    # the name travels RFC 2231-encoded, so every character survives
    encoded = "".join(f"%{b:02X}" for b in name.encode("utf-8"))
    raw = S.multipart(S.text_part(), S.part(b"harmless bytes", None,
                                            disposition=f"attachment; filename*=utf-8''{encoded}"))
    code, reason = await verdict_of(raw)
    assert code == 554, (name, reason)


@pytest.mark.parametrize("name", ["report.pdf", "photo.JPG", "notes.txt", "data.csv",
                                  "archive.exe.txt", "slides.pptx", "x.exempt"])
async def test_allowed_names(name):
    code, reason = await verdict_of(with_attachment(b"%PDF-1.4 plain data", name))
    assert code == 250, reason


async def test_bidi_name_is_banned_even_with_a_harmless_extension():
    raw = with_attachment(b"data", b'name="=?UTF-8?B?' + S.b64("report\u202eTXT.pdf".encode()).strip() + b'?="',
                          disposition="inline")
    code, reason = await verdict_of(raw)
    assert code == 554 and "bidi" in reason
    code, _ = await verdict_of(raw, bidi_names="allow")
    assert code == 250


async def test_name_in_content_type_only_and_mixed_keys():
    raw = S.multipart(S.text_part(), b'Content-Type: application/octet-stream; name="a.exe"\r\n\r\nxx')
    assert (await verdict_of(raw))[0] == 554
    raw = S.multipart(S.text_part(), b'Content-Type: application/octet-stream; filename="a.exe"\r\n\r\nxx')
    assert (await verdict_of(raw))[0] == 554


async def test_extension_options():
    raw = with_attachment(b"plain", "tool.py")
    assert (await verdict_of(raw))[0] == 554
    assert (await verdict_of(raw, allowed_extensions=["py"]))[0] == 250
    raw = with_attachment(b"plain", "a.xyz")
    assert (await verdict_of(raw, extra_extensions=[".XYZ"]))[0] == 554
    assert (await verdict_of(raw, banned_extensions=["xyz"]))[0] == 554
    assert (await verdict_of(with_attachment(b"plain", "a.exe"), banned_extensions=["xyz"]))[0] == 250


# --- by declared type -------------------------------------------------------------------------
async def test_banned_by_declared_type():
    raw = S.multipart(S.text_part(), S.part(b"data", None, ctype="application/x-msdownload"))
    code, reason = await verdict_of(raw)
    assert code == 554 and "declared type application/x-msdownload" in reason
    raw = S.multipart(S.text_part(), b"Content-Type: message/partial; id=1; number=1\r\n\r\nxx")
    assert (await verdict_of(raw))[0] == 554
    raw = S.multipart(S.text_part(), S.part(b"data", None, ctype="application/x-foo"))
    assert (await verdict_of(raw, banned_types=["application/*"]))[0] == 554


# --- by content --------------------------------------------------------------------------------
@pytest.mark.parametrize("maker, words", [
    (S.pe, "PE/MZ"), (S.elf, "ELF"), (S.macho, "Mach-O"), (S.macho_fat, "Mach-O"),
    (lambda: S.macho(b"\xfe\xed\xfa\xce"), "Mach-O"), (lambda: S.macho(b"\xce\xfa\xed\xfe"), "Mach-O"),
    (S.java_class, "Java"), (S.dex, "Java"), (S.script, "script"),
    (lambda: S.script(b"#! /usr/bin/env python3"), "script"), (S.lnk, "shortcut"),
    (S.iso, "disk image"), (S.udf, "disk image"), (S.vhd_fixed, "disk image"), (S.vhdx, "disk image"),
    (S.dmg, "disk image"), (S.fat_image, "disk image"), (S.chm, "CHM"),
])
async def test_banned_by_content_whatever_the_name(maker, words):
    code, reason = await verdict_of(with_attachment(maker(), "harmless.pdf"))
    assert code == 554 and words in reason, reason


async def test_content_kinds_are_options():
    raw = with_attachment(S.elf(), "a.pdf")
    assert (await verdict_of(raw, banned_content=["pe"]))[0] == 250


async def test_shebang_in_an_inline_text_body_is_text():
    raw = S.multipart(S.text_part("#!/bin/sh\r\necho this is how you do it\r\n"))
    assert (await verdict_of(raw))[0] == 250


async def test_text_starting_with_mz_is_text():
    assert (await verdict_of(with_attachment(b"MZ stands for Mitteleuropaeische Zeit", "a.txt")))[0] == 250


async def test_uuencoded_file_in_a_text_body():
    import binascii
    uu = b"begin 644 invoice.exe\r\n" + binascii.b2a_uu(S.pe()[:45]).replace(b"\n", b"\r\n") + b"`\r\nend\r\n"
    raw = S.multipart(S.text_part("see below\r\n" + uu.decode()))
    code, reason = await verdict_of(raw)
    assert code == 554 and "uuencoded invoice.exe" in reason


# --- archives ------------------------------------------------------------------------------------
async def test_zip_entries_by_name_and_content():
    code, reason = await verdict_of(with_attachment(S.zip_of({"docs/readme.txt": b"hi", "docs/run.exe": b"x"}), "a.zip"))
    assert code == 554 and "run.exe" in reason
    code, reason = await verdict_of(with_attachment(S.zip_of({"photo.jpg": S.pe()}), "a.zip"))
    assert code == 554 and "PE/MZ" in reason
    assert (await verdict_of(with_attachment(S.zip_of({"a.txt": b"hello", "b.pdf": b"%PDF"}), "a.zip")))[0] == 250


async def test_zip_found_by_content_not_name():
    code, _ = await verdict_of(with_attachment(S.zip_of({"x.scr": b"x"}), "report.pdf"))
    assert code == 554
    # a ".zip" that is not a zip (as in the corpus) is just a file
    assert (await verdict_of(with_attachment(b"<html>\n", "foo.zip")))[0] == 250


async def test_nested_zips_to_the_configured_depth():
    deep = S.nested_zip(3, {"evil.exe": b"x"})
    code, reason = await verdict_of(with_attachment(deep, "a.zip"))
    assert code == 554 and "evil.exe" in reason
    too_deep = S.nested_zip(5, {"fine.txt": b"x"})
    code, reason = await verdict_of(with_attachment(too_deep, "a.zip"))
    assert code == 554 and "nested deeper than 3" in reason
    assert (await verdict_of(with_attachment(too_deep, "a.zip"), archive_depth=5))[0] == 250
    assert (await verdict_of(with_attachment(too_deep, "a.zip"), uninspectable="allow"))[0] == 250


async def test_encrypted_archives():
    raw = with_attachment(S.encrypted_zip({"invoice.pdf": b"%PDF"}), "a.zip")
    code, reason = await verdict_of(raw)
    assert code == 554 and "encrypted" in reason
    assert (await verdict_of(raw, encrypted="allow"))[0] == 250
    # names are still read from an encrypted archive
    raw = with_attachment(S.encrypted_zip({"invoice.exe": b"x"}), "a.zip")
    assert (await verdict_of(raw, encrypted="allow"))[0] == 554


async def test_zip_bomb_is_bounded():
    import time
    bomb = S.zip_bomb(50 * 1024 * 1024)
    assert len(bomb) < 200_000
    t = time.perf_counter()
    code, reason = await verdict_of(with_attachment(bomb, "a.zip"))
    assert time.perf_counter() - t < 5
    assert code == 554 and "over the inspection limits" in reason
    # a stream that must be unpacked whole: by ratio, and by size with the ratio out of the way
    zeros = S.gzip_of(b"\x00" * (30 * 1024 * 1024), "zeros.tar")
    code, reason = await verdict_of(with_attachment(zeros, "z.gz"))
    assert code == 554 and "over the inspection limits" in reason
    code, reason = await verdict_of(with_attachment(S.zip_of({"z.gz": zeros}), "b.zip"),
                                    archive_max_ratio=100000, archive_max_size="10MB")
    assert code == 554 and "limit" in reason
    # a member we only need the head of is not unpacked at all: not a bomb to us
    assert (await verdict_of(with_attachment(S.zip_of({"a.zip": bomb}), "b.zip"),
                             archive_max_ratio=100000))[0] == 250


async def test_zip_entry_count_limit():
    many = S.zip_of({f"f{i}.txt": b"x" for i in range(50)})
    assert (await verdict_of(with_attachment(many, "a.zip")))[0] == 250
    code, reason = await verdict_of(with_attachment(many, "a.zip"), archive_max_entries=20)
    assert code == 554 and "too many archive entries" in reason


async def test_zip_names_that_disagree():
    lying = S.zip_lying_names("fine.txt", "evil.exe")
    code, reason = await verdict_of(with_attachment(lying, "a.zip"), uninspectable="allow")
    assert code == 554 and "evil.exe" in reason


async def test_corrupt_zip_is_uninspectable():
    broken = S.zip_of({"a.txt": b"hello" * 100})[:-30]
    code, reason = await verdict_of(with_attachment(broken, "a.zip"))
    assert code == 554 and "zip" in reason
    assert (await verdict_of(with_attachment(broken, "a.zip"), uninspectable="allow"))[0] == 250


async def test_jar_and_office_macros_in_zips():
    jar = S.zip_of({"META-INF/MANIFEST.MF": b"Manifest-Version: 1.0\n", "a/B.class": S.java_class()})
    code, reason = await verdict_of(with_attachment(jar, "game.zip"))
    assert code == 554 and "Java" in reason
    docm = S.zip_of({"[Content_Types].xml": b"<x/>", "word/document.xml": b"<x/>",
                     "word/vbaProject.bin": S.ole({"VBA/dir": b"x"})})
    code, reason = await verdict_of(with_attachment(docm, "letter.docx"))
    assert code == 554 and "macros" in reason
    assert (await verdict_of(with_attachment(docm, "letter.docx"), macros="allow"))[0] == 250
    docx = S.zip_of({"[Content_Types].xml": b"<x/>", "word/document.xml": b"<x/>"})
    assert (await verdict_of(with_attachment(docx, "letter.docx")))[0] == 250


@pytest.mark.parametrize("wrap", ["tar", "tgz", "tbz", "txz", "gz", "gz_named", "bz2", "xz"])
async def test_tar_and_compressed_streams(wrap):
    inner = {"bin/tool": S.elf()}
    data, name = {
        "tar": (S.tar_of(inner), "a.tar"),
        "tgz": (S.tar_of(inner, "w:gz"), "a.tgz"),
        "tbz": (S.tar_of(inner, "w:bz2"), "a.tar.bz2"),
        "txz": (S.tar_of(inner, "w:xz"), "a.tar.xz"),
        "gz": (S.gzip_of(S.pe()), "x.bin.gz"),
        "gz_named": (S.gzip_of(b"harmless", "setup.exe"), "x.gz"),
        "bz2": (S.bz2_of(S.pe()), "x.bz2"),
        "xz": (S.xz_of(S.pe()), "x.xz"),
    }[wrap]
    code, reason = await verdict_of(with_attachment(data, name))
    assert code == 554, reason
    clean = S.tar_of({"notes.txt": b"hello"}, "w:gz")
    assert (await verdict_of(with_attachment(clean, "notes.tgz")))[0] == 250


@pytest.mark.parametrize("maker", [S.rar, S.seven_zip])
async def test_archives_nothing_here_can_list(maker):
    code, reason = await verdict_of(with_attachment(maker(), "x.dat"))
    assert code == 554 and "cannot be listed" in reason
    assert (await verdict_of(with_attachment(maker(), "x.dat"), uninspectable="allow"))[0] == 250


# --- Office (OLE2) and TNEF -------------------------------------------------------------------
async def test_ole2_macros_msi_encryption_and_packages():
    doc = S.ole({"WordDocument": b"x", "Macros/VBA/dir": b"x", "Macros/VBA/_VBA_PROJECT": b"x"})
    code, reason = await verdict_of(with_attachment(doc, "letter.doc"))
    assert code == 554 and "macros" in reason
    assert (await verdict_of(with_attachment(doc, "letter.doc"), macros="allow"))[0] == 250
    assert (await verdict_of(with_attachment(S.ole({"WordDocument": b"x"}), "letter.doc")))[0] == 250
    assert (await verdict_of(with_attachment(S.xls_with_xlm(), "sheet.xls")))[0] == 554
    msi = S.ole({"x": b"x"}, clsid=S.MSI_CLSID)
    code, reason = await verdict_of(with_attachment(msi, "update.dat"))
    assert code == 554 and "installer" in reason
    enc = S.ole({"EncryptionInfo": b"x", "EncryptedPackage": b"x"})
    assert (await verdict_of(with_attachment(enc, "secret.docx")))[0] == 554
    assert (await verdict_of(with_attachment(enc, "secret.docx"), encrypted="allow"))[0] == 250
    pkg = S.ole({"WordDocument": b"x", "ObjectPool/_1/\x01Ole10Native": S.ole10native("evil.exe", b"x")})
    code, reason = await verdict_of(with_attachment(pkg, "letter.doc"))
    assert code == 554 and "evil.exe" in reason


async def test_broken_ole2_is_uninspectable():
    broken = S.ole({"WordDocument": b"x"})[:600]
    code, reason = await verdict_of(with_attachment(broken, "letter.doc"))
    assert code == 554 and "OLE2" in reason


async def test_tnef_winmail_dat():
    raw = S.multipart(S.text_part(), S.part(S.tnef("invoice.exe", b"x"), "winmail.dat",
                                            ctype="application/ms-tnef"))
    code, reason = await verdict_of(raw)
    assert code == 554 and "invoice.exe" in reason
    raw = S.multipart(S.text_part(), S.part(S.tnef("photo.jpg", S.pe()), "winmail.dat",
                                            ctype="application/ms-tnef"))
    assert (await verdict_of(raw))[0] == 554
    raw = S.multipart(S.text_part(), S.part(S.tnef("photo.jpg", b"\xff\xd8\xff"), "winmail.dat",
                                            ctype="application/ms-tnef"))
    assert (await verdict_of(raw))[0] == 250


async def test_forwarded_messages_are_searched():
    inner = S.multipart(S.text_part(), S.part(b"x", "payload.scr"), boundary="in")
    twice = S.multipart(S.text_part(), S.rfc822(inner), boundary="mid")
    code, reason = await verdict_of(S.multipart(S.text_part(), S.rfc822(twice)))
    assert code == 554 and "payload.scr" in reason
    code, _ = await verdict_of(S.multipart(S.text_part(), S.rfc822(inner, encoding="base64")))
    assert code == 554


# --- actions and replies -------------------------------------------------------------------------
async def test_reject_answers_554_and_relays_nothing():
    h = Harness([(Attachments, {"action": "reject"})])
    result = await h.send(with_attachment(S.pe(), "a.exe"))
    assert str(result.reply).startswith("554 5.7.1 Message refused: attachment a.exe not allowed")
    assert h.relayed == [] and h.quarantine.held == []
    assert result.trace[-1].action == "reject" and "a.exe" in result.trace[-1].reason


async def test_reply_text_is_ascii_and_one_line():
    raw = with_attachment(S.pe(), b"name*=utf-8''%E2%80%AE%0D%0Ax%C3%A9.exe")
    h = Harness([(Attachments, {})])
    result = await h.send(raw)
    line = str(result.reply)
    assert line.isascii() and "\r" not in line and "\n" not in line
    assert result.reply.code == 554


async def test_quarantine_keeps_the_original_and_answers_554():
    raw = with_attachment(S.pe(), "a.exe")
    h = Harness([(Attachments, {"action": "quarantine"})])
    result = await h.send(raw)
    assert str(result.reply).startswith("554 5.7.1 Message held for review: attachment a.exe")
    [held] = h.quarantine.held
    assert held["raw"] == raw and h.relayed == []
    assert [e.action for e in result.trace if e.stage == "data"] == ["quarantine", "quarantine"]
    assert result.trace[-1].reason == f"held as {held['id']}"


async def test_quarantine_and_deliver_the_stripped_copy():
    exe = S.part(S.pe(), "a.exe")
    raw = S.multipart(S.text_part(), exe)
    h = Harness([(Attachments, {"action": "quarantine", "quarantine_reply": "deliver"})])
    result = await h.send(raw)
    assert result.reply.code == 250
    [held] = h.quarantine.held
    assert held["raw"] == raw and held["verdict"].data == {"delivered": True}
    [relayed] = h.relayed
    assert relayed.data == result.message != raw and b"TVq" not in relayed.data
    assert any(e.action == "strip" for e in result.trace)


async def test_deliver_copy_is_dropped_when_the_downstream_refuses():
    raw = with_attachment(S.pe(), "a.exe")
    h = Harness([(Attachments, {"action": "quarantine", "quarantine_reply": "deliver"})],
                relay_replies={"data": "451 4.3.0 try later"})
    result = await h.send(raw)
    assert result.reply.code == 451
    assert h.quarantine.held == [] and h.quarantine.deleted == ["1"]


async def test_quarantine_store_failure_is_a_451_never_a_crash():
    from smtpgate import StoreError

    class Broken:
        def put(self, *a):
            raise StoreError("disk full")

    h = Harness([(Attachments, {"action": "quarantine"})])
    h.gate.quarantine = Broken()
    result = await h.send(with_attachment(S.pe(), "a.exe"))
    assert str(result.reply).startswith("451 4.3.0")
    h = Harness([(Attachments, {"action": "quarantine", "quarantine_reply": "deliver"})])
    h.gate.quarantine = Broken()
    result = await h.send(with_attachment(S.pe(), "a.exe"))
    assert str(result.reply).startswith("451 4.3.0") and h.relayed == []


async def test_shadow_mode_changes_and_keeps_nothing():
    raw = with_attachment(S.pe(), "a.exe")
    rule = Attachments({"action": "quarantine", "quarantine_reply": "deliver"}, Harness().context)
    rule.mode = "shadow"
    h = Harness([rule])
    result = await h.send(raw)
    assert result.reply.code == 250 and h.relayed[0].data == raw and h.quarantine.held == []
    strip = [e for e in result.trace if e.action == "strip"]
    assert strip and strip[0].shadow


async def test_custom_texts():
    raw = S.multipart(S.text_part(), S.part(S.pe(), "a.exe"))
    h = Harness([(Attachments, {"action": "strip", "note": "Removed {filename} ({type}): {reason}"})])
    result = await h.send(raw)
    assert b"Removed a.exe (application/octet-stream): banned extension .exe" in result.message
    result = await run_rule(Attachments, {"reject_text": "No {filename}"}, raw)
    assert str(result.reply) == "554 5.7.1 No a.exe"


@pytest.mark.parametrize("options", [
    {"action": "bounce"}, {"note": "{nope}"}, {"banned_extensions": ["a/b"]},
    {"banned_types": ["exe"]}, {"banned_content": ["virus"]}, {"archive_depth": -1},
    {"on_malformed": "ignore"}, {"archive_max_size": "lots"}, {"encrypted": "yes"},
])
def test_bad_options_fail_at_load(options):
    with pytest.raises(OptionError):
        Attachments(options, None)


async def test_check_config_names_file_and_line(tmp_path):
    import subprocess
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text(
        "domains: [example.com]\nrules:\n  - attachments: {action: bounce}\n")
    (tmp_path / "gate.yaml").write_text(f"policies: {tmp_path / 'policies'}\n")
    out = subprocess.run([sys.executable, "-m", "smtpgate", "check-config", "-c", str(tmp_path / "gate.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "default.yaml:3" in out.stdout and "action" in out.stdout


async def test_clean_message_is_untouched_and_mime_is_not_parsed_by_email():
    raw = S.multipart(S.text_part(), S.part(b"%PDF-1.4", "a.pdf", ctype="application/pdf"))
    h = Harness([(Attachments, {"action": "strip"})])
    result = await h.send(raw)
    assert result.message == raw and h.relayed[0].data == raw
    assert result.transaction.message._email is None  # the rule never asked the email package


# --- the corpus ------------------------------------------------------------------------------
def corpus_files():
    if not CORPUS.is_dir():
        return []
    return sorted(p for p in CORPUS.rglob("*") if p.is_file()
                  and not p.name.upper().startswith(("LICENSE", "README")))


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: str(p.relative_to(CORPUS)))
@pytest.mark.parametrize("action", ["strip", "reject"])
async def test_corpus_passes_byte_identical(path, action):
    import re
    raw = re.sub(rb"(?<!\r)\n", b"\r\n", path.read_bytes())
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    h = Harness([(Attachments, {"action": action})])
    result = await h.send(raw, sender="a@sender.test", recipients=["user@example.com"])
    assert result.reply.code == 250, (path.name, result.trace)
    assert result.message == raw and h.relayed[0].data == raw
    assert any(e.rule == "attachments" for e in result.trace)


def test_corpus_is_there():
    assert len(corpus_files()) >= 100


def test_verdict_constructors_used_here_exist():
    assert Verdict.quarantine("x").code == 554
