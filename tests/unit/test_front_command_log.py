"""aiosmtpd's per-command-line log (sanitized_log) as the front leaves it: skipped while
mail.log is off at that level, masked as aiosmtpd masks it once the level is on."""
import io
import logging

import aiosmtpd.smtp

import smtpgate.smtp.front  # noqa: F401  (installs the level check)

LINE = b"AUTH PLAIN c2VjcmV0\r\n"


def logged(level: int) -> str:
    log = logging.getLogger("mail.log")
    saved = log.level, log.propagate
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log.addHandler(handler)
    log.propagate = False
    try:
        log.setLevel(level)
        aiosmtpd.smtp.sanitized_log(log.debug, "readline: %r", LINE)
        aiosmtpd.smtp.sanitized_log(log.info, "%r >> %r", "peer", LINE)
        aiosmtpd.smtp.sanitized_log(log.warning, "other: %r", LINE)  # not a level it checks
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
    return out.getvalue()


def test_off_levels_log_nothing_and_on_levels_log_masked():
    assert logged(logging.WARNING) == "other: b'AUTH PLAIN ********\\r\\n'\n"
    assert logged(logging.DEBUG) == ("readline: b'AUTH PLAIN ********\\r\\n'\n"
                                     "'peer' >> b'AUTH PLAIN ********\\r\\n'\n"
                                     "other: b'AUTH PLAIN ********\\r\\n'\n")
