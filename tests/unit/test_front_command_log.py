"""aiosmtpd's per-command-line log (sanitized_log) as the front leaves it: skipped, masking
included, while mail.log is off at that level; masked as aiosmtpd masks it once it is on."""
import contextlib
import io
import logging

import aiosmtpd.smtp

from smtpgate.smtp import front  # installs the level check

LINE = b"AUTH PLAIN c2VjcmV0\r\n"


@contextlib.contextmanager
def mail_log(level: int):
    """aiosmtpd's logger at ``level``, writing to the StringIO yielded, restored after."""
    log = logging.getLogger("mail.log")
    saved = log.level, log.propagate
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(level)
    try:
        yield log, out
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def command_line_logged(level: int, monkeypatch) -> tuple[str, int]:
    """What aiosmtpd's two calls per command line log at ``level``, and how many times it
    masked a line (its ``sanitize``, looked up as a module global)."""
    masked = []
    sanitize = aiosmtpd.smtp.sanitize
    monkeypatch.setattr(aiosmtpd.smtp, "sanitize",
                        lambda text: masked.append(text) or sanitize(text))
    with mail_log(level) as (log, out):
        aiosmtpd.smtp.sanitized_log(log.debug, "_handle_client readline: %r", LINE)
        aiosmtpd.smtp.sanitized_log(log.info, "%r >> %r", "peer", LINE)
    return out.getvalue(), len(masked)


def test_the_front_replaces_aiosmtpds_command_log():
    assert aiosmtpd.smtp.sanitized_log is front._sanitized_log


def test_off_levels_log_and_mask_nothing(monkeypatch):
    assert command_line_logged(logging.WARNING, monkeypatch) == ("", 0)


def test_on_levels_log_masked(monkeypatch):
    assert command_line_logged(logging.DEBUG, monkeypatch) == (
        "_handle_client readline: b'AUTH PLAIN ********\\r\\n'\n"
        "'peer' >> b'AUTH PLAIN ********\\r\\n'\n", 2)


def test_other_calls_go_through_as_they_came():
    with mail_log(logging.WARNING) as (log, out):
        aiosmtpd.smtp.sanitized_log(log.warning, "other: %r", LINE)  # not a level it checks
    assert out.getvalue() == "other: b'AUTH PLAIN ********\\r\\n'\n"
