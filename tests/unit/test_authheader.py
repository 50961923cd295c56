"""The results channel's authentication results and the gate's one Authentication-Results
header (smtpgate/pipeline/authheader.py), parsed back with authres."""
import authres
import pytest

from smtpgate import Message, Results, Session, Transaction
from smtpgate.pipeline.authheader import MAX_LINE, add_authentication_results, header_value


def transaction(raw=b"From: <a@example.org>\r\n\r\nbody\r\n"):
    tx = Transaction("t1", Session("s1", "192.0.2.1"), "a@example.org")
    tx.message = Message(raw)
    return tx


def parse(value):
    return authres.all_features().parse("Authentication-Results: " + value)


def test_results_carry_auth_results_with_properties():
    results = Results()
    r = results.auth("dkim", "dkim", "fail", reason="body hash did not verify", header_d="example.org",
                     header_s="sel1", header_i=None)
    assert (r.method, r.result, r.reason, r.rule) == ("dkim", "fail", "body hash did not verify", "dkim")
    assert r.properties == (("header", "d", "example.org"), ("header", "s", "sel1"))
    assert r.get("header", "d") == "example.org"
    assert results.get("dkim").auth == [r]
    assert results.auth_results("spf") == [] and results.auth_results("dkim") == [r]
    assert results.as_dict()["dkim"]["auth"] == [
        "dkim=fail header.d=example.org header.s=sel1 (body hash did not verify)"]


@pytest.mark.parametrize("args, kw", [
    (("Dkim", "pass"), {}), (("dkim", "ok"), {}), (("dkim", "pass"), {"d": "x"})])
def test_bad_auth_results_are_refused(args, kw):
    with pytest.raises(ValueError):
        Results().auth("r", *args, **kw)


def test_shadow_results_are_recorded_but_left_out():
    results = Results()
    results._current = ("dmarc", True)
    results.auth("dmarc", "dmarc", "fail", header_from="example.org")
    assert results.get("dmarc").auth[0].shadow
    assert results.auth_results() == []


def test_no_result_asking_means_no_header_and_identical_bytes():
    tx = transaction()
    tx.session.results.auth("fcrdns", "iprev", "pass", comment="mx.example.org",
                            policy_iprev="192.0.2.1", header=False)
    assert add_authentication_results(tx, "gate.example") is None
    assert tx.message.raw == b"From: <a@example.org>\r\n\r\nbody\r\n"
    assert tx.authentication_results is None


def test_one_header_with_every_result_session_first():
    tx = transaction()
    tx.session.results.auth("fcrdns", "iprev", "pass", comment="mx (example) org",
                            policy_iprev="192.0.2.1", header=False)
    tx.results.auth("spf", "spf", "pass", smtp_mailfrom="a@example.org", header=False)
    tx.results.auth("dkim", "dkim", "pass", header_d="example.org", header_s="s1")
    tx.results.auth("dmarc", "dmarc", "pass", header_from="example.org", policy_dmarc="none")
    value = add_authentication_results(tx, "gate.example")
    assert tx.authentication_results == value
    field, _, rest = tx.message.raw.partition(b"\r\n")
    assert rest == b"From: <a@example.org>\r\n\r\nbody\r\n"
    parsed = parse(field.decode().partition(": ")[2])
    assert parsed.authserv_id == "gate.example"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("iprev", "pass"), ("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass")]
    assert parsed.results[2].header_d == "example.org"
    assert parsed.results[3].header_from == "example.org"


def test_hostile_values_stay_one_line_and_within_smtp_limits():
    tx = transaction()
    for i in range(40):
        tx.results.auth("dkim", "dkim", "fail", reason=f"bad\r\nX-Evil: {i}\x00 ; \"q\"",
                        header_d=f"d{i}.example; dkim=pass", header_s="s\r\n1")
    value = add_authentication_results(tx, "gate.example")
    field = tx.message.raw.partition(b"\r\n")[0]
    assert len(field) <= MAX_LINE and b"\n" not in field and b"\x00" not in field
    parsed = parse(value)
    assert 0 < len(parsed.results) < 40
    assert all(r.method == "dkim" and r.result == "fail" for r in parsed.results)


def test_header_value_without_results_says_none():
    assert header_value("gate.example", []) == "gate.example; none"


def test_a_flood_of_results_is_cut_to_one_line_in_linear_work():
    # a message with thousands of signatures must not cost the loop seconds (the header used
    # to be rebuilt once per result dropped): count authres builds, not time
    import authres
    built = []
    real = authres.AuthenticationResultsHeader.__str__

    def counting(self):
        built.append(1)
        return real(self)

    tx = transaction()
    for i in range(3000):
        tx.results.auth("dkim", "dkim", "neutral", reason="not checked", header_d=f"d{i}.example")
    authres.AuthenticationResultsHeader.__str__ = counting
    try:
        value = header_value("gate.example", tx.results.auth_results())
    finally:
        authres.AuthenticationResultsHeader.__str__ = real
    assert len(built) <= 3
    assert len("Authentication-Results: " + value) <= MAX_LINE
    assert 0 < len(parse(value).results) < 3000


def test_non_ascii_values_are_written_as_ascii():
    tx = transaction()
    tx.results.auth("dmarc", "dmarc", "fail", reason="zu spät", header_from="bänk.example")
    tx.results.auth("spf", "spf", "pass", smtp_mailfrom="jörg@bänk.example")
    value = add_authentication_results(tx, "gate.example")
    assert value.isascii()
    parsed = parse(value)
    assert parsed.results[0].header_from == "xn--bnk-qla.example"
    assert parsed.results[0].reason == "zu sp?t"
    assert parsed.results[1].properties == []


def test_signatures_never_push_the_dmarc_and_arc_results_out():
    # a message's own (failing) signatures are the one thing a sender can multiply: when the
    # line is full, dkim results go before the verdicts that are one per message
    tx = transaction()
    tx.session.results.auth("fcrdns", "iprev", "pass", policy_iprev="192.0.2.1")
    for i in range(5):
        tx.results.auth("dkim", "dkim", "fail", reason="x" * 150, header_d=f"{'d' * 200}{i}.example")
    tx.results.auth("dmarc", "dmarc", "fail", header_from="example.org")
    tx.results.auth("arc", "arc", "none")
    value = add_authentication_results(tx, "gate.example")
    methods = [r.method for r in parse(value).results]
    assert methods[0] == "iprev" and methods[-2:] == ["dmarc", "arc"]
    assert 0 < methods.count("dkim") < 5
    assert len("Authentication-Results: " + value) <= MAX_LINE
