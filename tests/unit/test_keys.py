"""smtpgate.sender_key / client_key: the one definition every counting rule and the gate key by.

The sender cases in depth are the greylist rule's (tests/rules/test_greylist_rule.py,
test_sender_normalisation); here: the contract each user relies on."""
import pytest

from smtpgate import client_key, sender_key
from smtpgate.smtp.connections import client_key as connection_key
from smtpgate_rules.greylist import Greylist, normalise_sender
from smtpgate_rules.limits import Limits


@pytest.mark.parametrize("text", ["", "<>", "  ", "postmaster"])
def test_the_null_sender_and_bare_words_have_no_sender_key(text):
    assert sender_key(text) is None


def test_greylist_keys_the_null_sender_as_empty_text():
    assert normalise_sender("<>") == "" and normalise_sender("") == ""


@pytest.mark.parametrize("ip, v4, v6, key", [
    ("192.0.2.7", None, None, "192.0.2.7"),
    ("192.0.2.7", 24, 64, "192.0.2.0/24"),
    ("::ffff:192.0.2.7", 24, 64, "192.0.2.0/24"),  # IPv4-mapped: the IPv4 client
    ("[2001:db8:1:2::9]", None, None, "2001:db8:1:2::9"),
    ("2001:db8:1:2:aaaa::1", 24, 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:2aa::1", None, 56, "2001:db8:1:200::/56"),
    ("fe80::1%eth0", None, 64, "fe80::/64"),
    ("/run/smtpgate.sock", 24, 64, None),
])
def test_client_key(ip, v4, v6, key):
    assert client_key(ip, v4, v6) == key


@pytest.mark.parametrize("ip", ["192.0.2.7", "::ffff:192.0.2.7", "2001:db8:1:2:aaaa::1", "/run/x.sock"])
def test_the_connection_table_and_the_limits_rule_count_a_client_alike(ip):
    assert connection_key(ip, 64) == Limits({}).key_for("connections", ip)


def test_greylist_and_limits_key_a_network_alike():
    greylist, limits = Greylist({"ipv4_prefix": 22}), Limits({"ipv4_prefix": 22})
    for ip in ("192.0.2.7", "2001:db8::1", "::ffff:198.51.100.9"):
        assert greylist.client_network(ip) == limits.key_for("client_net", ip)
