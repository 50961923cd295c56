"""Envelope path parsing and the open-relay check (DESIGN.md: "Not an open relay")."""
from __future__ import annotations

import random

import pytest

from smtpgate.mail.addresses import (
    Address,
    AddressError,
    ParsedPath,
    helo_refusal,
    normalise_domain,
    parse_address,
    parse_path,
    relay_refusal,
)
from smtpgate.mail.reply import Reply

GOVERNED = {"example.com"}


def gate_decision(arg: str, *, smtputf8: bool = True) -> str:
    """What the front does with ``RCPT TO:<arg>``: "parse", "relay", "foreign" or "ok"."""
    try:
        addr = parse_path(arg, smtputf8=smtputf8).address
    except AddressError as e:
        assert 500 <= e.code < 600
        return "parse"
    assert addr is not None
    if relay_refusal(addr):
        return "relay"
    if addr.domain == "":
        return "ok"  # the gate's own postmaster
    return "ok" if normalise_domain(addr.domain) in GOVERNED else "foreign"


# --- every spelling an open-relay tester tries ------------------------------------------

RELAY_TABLE = [
    # percent hack, bang paths
    ("user%evil.test@example.com", "relay"),
    ("<user%evil.test@example.com>", "relay"),
    ("evil.test!user@example.com", "relay"),
    ("user!evil.test@example.com", "relay"),
    ("<evil.test!user@example.com>", "relay"),
    # source routes, bracketed and bare
    ("@example.com:user@evil.test", "relay"),
    ("<@example.com:user@evil.test>", "relay"),
    ("<@evil.test:user@example.com>", "relay"),
    ("<@a.example.com,@evil.test:user@example.com>", "relay"),
    # quoted local parts holding routing
    ('"user@evil.test"@example.com', "relay"),
    ('<"user@evil.test"@example.com>', "relay"),
    ('"user%evil.test"@example.com', "relay"),
    ('"evil.test!user"@example.com', "relay"),
    ('"user\\@evil.test"@example.com', "relay"),
    ('"@evil.test:user"@example.com', "relay"),
    ('"user,other"@example.com', "relay"),
    ('"<user@evil.test>"@example.com', "relay"),
    # address literals and bare IPs
    ("user@[127.0.0.1]", "relay"),
    ("<user@[127.0.0.1]>", "relay"),
    ("user@[IPv6:::1]", "relay"),
    ("user@[ipv6:2001:db8::1]", "relay"),
    ("user@127.0.0.1", "relay"),
    ("user@2130706433", "relay"),
    ("user@1.2.3", "relay"),
    # trailing dots, empty labels, non-LDH
    ("user@example.com.", "relay"),
    ("<user@EXAMPLE.COM.>", "relay"),
    ("user@example..com", "parse"),
    ("user@.example.com", "parse"),
    ("user@example.com..", "parse"),
    ("user@ex_ample.com", "relay"),
    ("user@-example.com", "relay"),
    ("user@example-.com", "relay"),
    ("user@" + "a" * 64 + ".com", "relay"),
    # Unicode spellings that an IDNA codec would map onto the governed name
    ("user@ｅｘａｍｐｌｅ.com", "relay"),
    ("user@example\u3002com", "relay"),
    ("user@example\uff0ecom", "relay"),
    ("user@exa\u200dmple.com", "relay"),
    # foreign domains and subdomains
    ("user@evil.test", "foreign"),
    ("<user@evil.test>", "foreign"),
    ("user@sub.example.com", "foreign"),
    ("user@example.com.evil.test", "foreign"),
    ("user@evilexample.com", "foreign"),
    ("user@bücher.example", "foreign"),
    # fine
    ("user@example.com", "ok"),
    ("<user@example.com>", "ok"),
    ("USER@EXAMPLE.COM", "ok"),
    ("<User@Example.Com>", "ok"),
    ('"john doe"@example.com', "ok"),
    ('"user"@example.com', "ok"),
    ("first.last+tag@example.com", "ok"),
    ("<Postmaster>", "ok"),
    ("<POSTMASTER>", "ok"),
    ("postmaster", "ok"),
    ("postmaster@example.com", "ok"),
    # garbage never gets as far as a decision
    ("user@evil.test@example.com", "parse"),
    ("user@example.com@evil.test", "parse"),
    ("<user@example.com", "parse"),
    ("user@example.com>", "parse"),
    ("user@example.com%evil.test", "parse"),
    ("user@example.com!evil.test", "parse"),
    ("user@example.com:evil.test", "parse"),
    ("user@example.com,user@evil.test", "parse"),
    ("<user@example.com>,<user@evil.test>", "parse"),
    ("user@example.com\r\nRCPT TO:<user@evil.test>", "parse"),
    ("user@example.com\x00@evil.test", "parse"),
    ("<@evil.test:Postmaster>", "parse"),
    ('"postmaster"', "parse"),
    ("user", "parse"),
]


@pytest.mark.parametrize("arg,expected", RELAY_TABLE)
def test_open_relay_spellings(arg, expected):
    assert gate_decision(arg) == expected


@pytest.mark.parametrize("arg", [a for a, e in RELAY_TABLE if e in ("relay", "foreign", "parse")])
def test_refused_without_smtputf8_too(arg):
    assert gate_decision(arg, smtputf8=False) != "ok"


@pytest.mark.parametrize(
    "addr",
    [
        Address("user", "evil.test", "@example.com"),
        Address("user%evil.test", "example.com"),
        Address("user!x", "example.com"),
        Address("user@evil.test", "example.com"),  # built by hand, not by the parser
        Address('"a@b"', "example.com"),
        Address("", "example.com"),
        Address('"', "example.com"),
        Address("user", "[1.2.3.4]"),
        Address("user", "::1"),
        Address("user", "a..b"),
        Address("user", ".example.com"),
        Address("user", "example.com."),
        Address("user", "exa mple.com"),
        Address("user", ""),
        Address('"postmaster"', ""),
        Address("user", "x" * 250 + ".com"),
    ],
)
def test_relay_refusal_on_hand_built_addresses(addr):
    assert relay_refusal(addr)


@pytest.mark.parametrize(
    "addr",
    [
        Address("user", "example.com"),
        Address("USER", "EXAMPLE.COM"),
        Address('"john doe"', "example.com"),
        Address("Postmaster", ""),
        Address("user", "bücher.example"),
        Address("user", "xn--bcher-kva.example"),
    ],
)
def test_relay_refusal_none(addr):
    assert relay_refusal(addr) is None


# --- parsing ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "arg,local,domain,route,params",
    [
        ("<a@b.example>", "a", "b.example", "", []),
        (" <a@b.example>", "a", "b.example", "", []),
        ("   <a@b.example>  ", "a", "b.example", "", []),
        ("a@b.example", "a", "b.example", "", []),
        ("<a@b.example> SIZE=1000 BODY=8BITMIME", "a", "b.example", "", ["SIZE=1000", "BODY=8BITMIME"]),
        ("<a@b.example>  SIZE=1000   BODY=8BITMIME ", "a", "b.example", "", ["SIZE=1000", "BODY=8BITMIME"]),
        ("a@b.example SIZE=1000", "a", "b.example", "", ["SIZE=1000"]),
        ("<a@b.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bb@c.example", "a", "b.example", "",
         ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a+2Bb@c.example"]),
        ("<a@b.example> AUTH=<>", "a", "b.example", "", ["AUTH=<>"]),
        ("<a@b.example> smtputf8", "a", "b.example", "", ["smtputf8"]),
        ("<Mixed.Case@Example.COM>", "Mixed.Case", "Example.COM", "", []),
        ('<"john doe"@example.com>', '"john doe"', "example.com", "", []),
        ('"john doe"@example.com SIZE=5', '"john doe"', "example.com", "", ["SIZE=5"]),
        ('<"a\\"b"@example.com>', '"a\\"b"', "example.com", "", []),
        ('<"a>b"@example.com>', '"a>b"', "example.com", "", []),
        ("<@r1.example,@r2.example:u@d.example>", "u", "d.example", "@r1.example,@r2.example", []),
        ("<u@[192.0.2.1]>", "u", "[192.0.2.1]", "", []),
        ("<u@[IPv6:2001:db8::1]>", "u", "[IPv6:2001:db8::1]", "", []),
        ("<u@[IPv6:::ffff:192.0.2.1]>", "u", "[IPv6:::ffff:192.0.2.1]", "", []),
        ("<u@[x-tag:whatever]>", "u", "[x-tag:whatever]", "", []),
        ("<u@example.com.>", "u", "example.com.", "", []),
        ("<!#$%&'*+-/=?^_`{|}~@example.com>", "!#$%&'*+-/=?^_`{|}~", "example.com", "", []),
        ("<Postmaster>", "Postmaster", "", "", []),
        ("<postMASTER>", "postMASTER", "", "", []),
        ("postmaster", "postmaster", "", "", []),
        ("postmaster SIZE=10", "postmaster", "", "", ["SIZE=10"]),
        ("<" + "a" * 64 + "@example.com>", "a" * 64, "example.com", "", []),
    ],
)
def test_parse_ok(arg, local, domain, route, params):
    parsed = parse_path(arg)
    assert isinstance(parsed, ParsedPath)
    a = parsed.address
    assert (a.local, a.domain, a.route, parsed.params) == (local, domain, route, params)


@pytest.mark.parametrize("arg,params", [("<>", []), (" <>", []), ("<> SIZE=0", ["SIZE=0"]),
                                        ("<>  BODY=8BITMIME SMTPUTF8", ["BODY=8BITMIME", "SMTPUTF8"])])
def test_null_path(arg, params):
    parsed = parse_path(arg)
    assert parsed.address is None and parsed.is_null
    assert parsed.params == params
    assert parsed.wire() == "<>"


@pytest.mark.parametrize(
    "arg,wire,text",
    [
        ("<John.Smith@Example.COM>", "<John.Smith@Example.COM>", "John.Smith@Example.COM"),
        ("USER@EXAMPLE.COM", "<USER@EXAMPLE.COM>", "USER@EXAMPLE.COM"),
        ('<"John Doe"@example.com>', '<"John Doe"@example.com>', '"John Doe"@example.com'),
        ('"a\\\\b"@example.com', '<"a\\\\b"@example.com>', '"a\\\\b"@example.com'),
        ("<@route.example:User@Example.com>", "<User@Example.com>", "User@Example.com"),
        ("<Postmaster>", "<Postmaster>", "Postmaster"),
    ],
)
def test_wire_preserves_case_and_quoting(arg, wire, text):
    a = parse_path(arg).address
    assert a.wire() == wire
    assert str(a) == text


def test_address_properties():
    a = parse_path('<"John \\"JJ\\" Doe"@Example.COM>').address
    assert a.is_quoted and not a.is_literal
    assert a.unquoted_local == 'John "JJ" Doe'
    assert a.domain_lower == "example.com"
    assert not a.is_postmaster
    b = parse_path("<u@[192.0.2.1]>").address
    assert b.is_literal and not b.is_quoted
    c = parse_path("<plain@x.example>").address
    assert c.unquoted_local == "plain" and not c.is_quoted
    assert parse_path("<PostMaster@Example.com>").address.is_postmaster
    assert parse_path("<Postmaster>").address.is_postmaster
    assert not parse_path('<"postmaster"@example.com>').address.is_postmaster
    assert Address("a", "b") == Address("a", "b", "", is_quoted=False, is_literal=False)
    with pytest.raises(ValueError):
        Address('"a b"', "x", is_quoted=False)
    with pytest.raises(AttributeError):
        c.local = "x"  # frozen


@pytest.mark.parametrize(
    "arg",
    [
        "", " ", "<", ">", "<<a@b>>", "<<a@b>", "<a@b>>", "a@", "<a@>", "@b", "<@b>", "a@b@c",
        "<a@b", "a@b>", "<a@b>x", "<a@b>SIZE=1", "< a@b>", "<a @b>", "<a@ b>", "<a@b >",
        "a b@c", "a@b c@d", '<"a"b@c>', '<a"b"@c>', "<.a@b>", "<a.@b>", "<a..b@c>", "<.@b>",
        '<"unterminated@b>', '"unterminated@b', '<""@b>', '<"a\\', "<a\\b@c>",
        "<a@b\x00>", "<a\x00@b>", "\x00", "<a@b>\r", "<a@b>\r\n", "<a@b>\n", "<a\r@b>", "<a@b>\t",
        "\t<a@b>", "<a@b\x7f>", "<a@b> SIZE=1\x00", '<"a\x01"@b>', "<a@b\x85>",
        "<a@b> =1", "<a@b> -X=1", "<a@b> SI@E=1", "<a@b> <c@d>",
        "<@a:>", "<@a,b:c@d>", "<@a@c@d>", "<@:c@d>", "<@[1.2.3.4]:c@d>", "@a,@b", "<@a:@b:c@d>",
        "<a@[1.2.3.4>", "<a@[]>", "<a@[1.2.3]>", "<a@[1.2.3.400]>", "<a@[IPv6:1.2.3.4]>",
        "<a@[IPv6:zz::1]>", "<a@[1.2.3.4]x>", "<a@[a[b]>", "<a@[:x]>", "<a@[tag:]>",
        "<a@b,c>", "<a@b;c>", "<a@(b)>", "<(c)a@b>", "<a(c)@b>", "<a@b%c>",
        "<Postmaster@>", "<@a:Postmaster>", '<"Postmaster">', "<postmasters>", "<Postmaster",
        "<" + "a" * 65 + "@example.com>",
        "<a@" + "b" * 256 + ">",
        "<" + "a" * 60 + "@" + ("d" * 60 + ".") * 4 + "com>",  # path over 256 octets
        "a" * 60 + "@" + ("d" * 60 + ".") * 4 + "com",
        "<@" + ("r" * 60 + ".") * 4 + "x:a@b.example>",
        "<" + "x" * 300 + ">",
        "x" * 300,
        "<" + "a@b" * 100 + ">",
    ],
)
def test_garbage(arg):
    with pytest.raises(AddressError) as ei:
        parse_path(arg, smtputf8=True)
    e = ei.value
    assert 500 <= e.code < 600
    assert e.enhanced.startswith("5.")
    assert str(e).startswith(f"{e.code} {e.enhanced} ")
    assert isinstance(e.reply, Reply) and e.reply.code == e.code and e.reply.enhanced == e.enhanced


@pytest.mark.parametrize(
    "arg,local,domain",
    [
        ("<josé@example.com>", "josé", "example.com"),
        ("<user@bücher.example>", "user", "bücher.example"),
        ("<用户@例子.广告>", "用户", "例子.广告"),
        ('<"José Ñ"@example.com>', '"José Ñ"', "example.com"),
    ],
)
def test_utf8_with_and_without_smtputf8(arg, local, domain):
    a = parse_path(arg, smtputf8=True).address
    assert (a.local, a.domain) == (local, domain)
    assert not a.is_ascii
    assert a.wire() == arg
    with pytest.raises(AddressError) as ei:
        parse_path(arg)
    assert ei.value.code == 553 and ei.value.enhanced == "5.6.7"


@pytest.mark.parametrize(
    "arg",
    [
        "<a\u00a0b@example.com>",  # no-break space
        "<ab@exa\u2028mple.com>",  # line separator
        "<a\u0085@example.com>",  # C1 control
        "<a\udcff@example.com>",  # lone surrogate (undecodable byte via surrogateescape)
        "<a@b> X=\udcff",
    ],
)
def test_bad_unicode_always_refused(arg):
    with pytest.raises(AddressError):
        parse_path(arg, smtputf8=True)
    with pytest.raises(AddressError):
        parse_path(arg, smtputf8=False)


def test_non_ascii_param_needs_smtputf8():
    with pytest.raises(AddressError):
        parse_path("<a@b> X-NAME=jos\u00e9")
    assert parse_path("<a@b> X-NAME=jos\u00e9", smtputf8=True).params == ["X-NAME=jos\u00e9"]


def test_length_limits_are_octets():
    ok = "é" * 32  # 64 octets
    assert parse_path(f"<{ok}@example.com>", smtputf8=True).address.local == ok
    with pytest.raises(AddressError):
        parse_path(f"<{ok}é@example.com>", smtputf8=True)  # 66 octets, 33 characters
    # 256-octet path incl. brackets is fine, 257 is not
    domain = ".".join(["d" * 60] * 3) + "." + "e" * (256 - len("<a@>") - 183)
    path = f"<a@{domain}>"
    assert len(path) == 256
    assert parse_path(path).address.domain == domain
    with pytest.raises(AddressError):
        parse_path(f"<ab@{domain}>")


@pytest.mark.parametrize(
    "domain,normal",
    [
        ("EXAMPLE.COM", "example.com"),
        ("Example.Com", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("[IPv6:::1]", "[ipv6:::1]"),
        ("a..bü", "a..bü"),  # the codec refuses it: lower-cased as it is
        ("", ""),
    ],
)
def test_normalise_domain(domain, normal):
    assert normalise_domain(domain) == normal


def test_parse_address():
    assert parse_address("User@Example.com") == Address("User", "Example.com")
    assert parse_address(" <User@Example.com> ") == Address("User", "Example.com")
    for bad in ("", "<>", "a@b SIZE=1", "a@"):
        with pytest.raises(AddressError):
            parse_address(bad)


_ALPHABET = list('<>@"\\.:,[] %!aZ0-_=\x00\r\n\téü\u3002') + ["IPv6:", "postmaster", "SIZE=1"]


def test_fuzz_never_raises_anything_else():
    rnd = random.Random(5321)
    for _ in range(20000):
        arg = "".join(rnd.choice(_ALPHABET) for _ in range(rnd.randint(0, 24)))
        for utf8 in (False, True):
            try:
                parsed = parse_path(arg, smtputf8=utf8)
            except AddressError as e:
                assert 500 <= e.code < 600
                continue
            a = parsed.address
            if a is not None:
                relay_refusal(a)
                normalise_domain(a.domain)
                # whatever parses, re-parses to the same thing from its wire form
                assert parse_path(a.wire(), smtputf8=utf8).address == Address(a.local, a.domain)


_SEEDS = [
    "<user@example.com>", '"john doe"@example.com', "<@a.example:u@example.com> SIZE=1",
    "<u@[IPv6:::1]>", "<Postmaster>", "first.last+tag@example.com", "<josé@bücher.example>",
]
_MUTANTS = list('<>@"\\.:,[]%! \x00\r\n') + ["\u3002", "ｅ", "evil.test", "IPv6:", "127.0.0.1", "é"]


def test_fuzz_mutations_never_open_relay():
    rnd = random.Random(821)
    accepted = 0
    for _ in range(30000):
        s = list(rnd.choice(_SEEDS))
        for _ in range(rnd.randint(1, 3)):
            op, at = rnd.randrange(3), rnd.randint(0, len(s))
            if op == 0:
                s.insert(at, rnd.choice(_MUTANTS))
            elif s and at < len(s):
                if op == 1:
                    del s[at]
                else:
                    s[at] = rnd.choice(_MUTANTS)
        arg = "".join(s)
        if gate_decision(arg) != "ok":
            continue
        accepted += 1
        a = parse_path(arg, smtputf8=True).address
        assert a.route == "" and not a.is_literal
        assert not set(a.unquoted_local) & set("@%!:,<>[]")
        assert a.domain == "" and a.is_postmaster or a.domain.lower() == "example.com"
    assert accepted > 100  # the fuzzer does reach the accepting path


# helo_refusal scans with two regular expressions instead of a loop per character; the
# characters at the edges of each class (checked against the loop on 400,000 generated names)
@pytest.mark.parametrize("name, why", [
    ("client.test", None), ("mail_out-1.example.", None), ("localhost", None), ("192.0.2.1", None),
    ("[192.0.2.1]", None), ("[IPv6:2001:db8::1]", None),
    ("a b", "spaces or control"), ("a\tb", "spaces or control"), ("a\x00", "spaces or control"),
    ("\x1fa", "spaces or control"), ("a\x7f", "spaces or control"), ("a\x80b", "spaces or control"),
    ("a\x9f", "spaces or control"), ("a\xa0b", "non-ASCII"), ("h\u00e9.test", "non-ASCII"),
    ("a+b", "not a domain name"), ("a=b", "not a domain name"), ("a]", "not a domain name"),
    ("a:b", "not a domain name"), ("a/b", "not a domain name"), ("a..b", "empty label"),
])
def test_helo_refusal_edges(name, why):
    got = helo_refusal(name)
    assert got is None if why is None else why in got
