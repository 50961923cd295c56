"""Replies and verdicts: the values the core turns into wire lines."""
import pytest

from smtpgate import Reply, Verdict


def test_reply_lines_and_parse():
    r = Reply(550, "no\nreally no", "5.7.1")
    assert r.lines() == ["550-5.7.1 no", "550 5.7.1 really no"]
    assert Reply.parse("451 4.7.1 later") == Reply(451, "later", "4.7.1")
    assert Reply.parse("250 Ok").with_enhanced() == Reply(250, "Ok", "2.0.0")
    with pytest.raises(ValueError):
        Reply.parse("hello")


def test_downstream_reply_kept_verbatim():
    r = Reply.from_downstream(550, "5.1.1 <x@example.com>: Recipient address rejected")
    assert str(r) == "550 5.1.1 <x@example.com>: Recipient address rejected"
    multi = Reply.from_downstream(554, "5.7.1 first\n5.7.1 second")
    assert str(multi) == "554-5.7.1 first\r\n554 5.7.1 second"


def test_verdict_defaults_per_stage():
    assert str(Verdict.reject("no").reply("rcpt")) == "550 5.7.1 no"
    assert str(Verdict.reject("no").reply("data")) == "554 5.7.1 no"
    assert str(Verdict.tempfail("later").reply("rcpt")) == "451 4.7.1 later"
    assert Verdict.accept().reply("rcpt").code == 250


def test_verdict_refuses_nonsense():
    with pytest.raises(ValueError):
        Verdict.reject("x", code=451)
    with pytest.raises(ValueError):
        Verdict.tempfail("x", code=550)
    with pytest.raises(ValueError):
        Verdict.reject("two\r\nlines")
    with pytest.raises(ValueError):
        Verdict("maybe")
