"""The openspf RFC 7208 test suite (tests/data/spf/rfc7208-tests.yml, BSD-licensed, see
rfc7208-tests.LICENSE next to it), every case run against smtpgate_rules.spf.check.

Each YAML document is a scenario: ``zonedata`` (the DNS) and ``tests`` (a client address,
HELO name and MAIL FROM, and the result(s) the RFC allows). The zone is served by a
``FakeResolver`` that reads the suite's notation:

- ``- TIMEOUT`` on its own: queries for that name time out, except for the types it lists
  records of (a name with a TXT record and ``TIMEOUT`` answers TXT, and times out on SPF);
- ``- A: TIMEOUT`` (any type): queries of that type time out;
- ``SPF`` records (type 99, dropped by RFC 7208) also serve as that name's TXT records
  unless the name lists TXT records of its own — the suite's convention, since its other
  sections test record content, not the record type; ``TXT: NONE`` means no TXT at all;
- ``CNAME``: followed, as the real resolver follows CNAME chains in an answer;
- ``MX: [10, host]``, and TXT/SPF given as a list of strings (one record of several
  character-strings, joined as the real resolver joins them).
"""
from __future__ import annotations


import pytest
import yaml

from smtpgate.resolver import DnsAnswer, DnsError
from smtpgate_rules.spf.check import check_helo, check_mailfrom
from smtpgate.testing import FakeResolver
from tests.support.constants import DATA

SUITE = DATA / "spf" / "rfc7208-tests.yml"
RECEIVER = "receiver.example"  # %{r}


class SuiteZone(FakeResolver):
    """DNS answers from one scenario's ``zonedata``."""

    def __init__(self, zonedata: dict):
        super().__init__()
        self.timeouts: set[str] = set()  # names whose queries for unlisted types time out
        self.zone: dict[tuple[str, str], list[str] | str] = {}
        for name, entries in (zonedata or {}).items():
            self._load(name.lower().rstrip("."), entries or [])

    def _load(self, name: str, entries: list) -> None:
        spf: list[str] = []
        has_txt = False
        for entry in entries:
            if entry == "TIMEOUT":
                self.timeouts.add(name)
                continue
            ((rdtype, value),) = entry.items()
            if value == "TIMEOUT":
                self.zone[name, rdtype] = "TIMEOUT"
                continue
            if rdtype in ("TXT", "SPF"):
                if rdtype == "TXT":
                    has_txt = True
                if value == "NONE":
                    continue
                text = "".join(value) if isinstance(value, list) else str(value)
                if rdtype == "SPF":
                    spf.append(text)
                    continue
                self._add(name, "TXT", text)
            elif rdtype == "MX":
                self._add(name, "MX", f"{value[0]} {str(value[1]).lower().rstrip('.')}")
            elif rdtype in ("PTR", "CNAME"):
                self._add(name, rdtype, str(value).lower().rstrip("."))
            else:
                self._add(name, rdtype, str(value))
        if spf and not has_txt:
            for text in spf:
                self._add(name, "TXT", text)

    def _add(self, name: str, rdtype: str, value: str) -> None:
        found = self.zone.setdefault((name, rdtype), [])
        if isinstance(found, list):
            found.append(value)

    async def _query(self, name: str, rdtype: str) -> DnsAnswer:
        self.queries.append((name, rdtype))
        name = name.replace("\\032", " ")  # presentation format, as a server reads it off the wire
        for _ in range(8):  # a CNAME chain, as the real resolver follows it in the answer
            value = self.zone.get((name, rdtype), [])
            if name in self.timeouts and not value:
                raise DnsError("timeout", name, rdtype, "scripted by the test suite")
            if value == "TIMEOUT":
                raise DnsError("timeout", name, rdtype, "scripted by the test suite")
            if value or rdtype == "CNAME":
                return DnsAnswer(name, rdtype, tuple(value), self.ttl)
            target = self.zone.get((name, "CNAME"))
            if not target or target == "TIMEOUT":
                break
            name = target[0]
        exists = any(n == name for n, _ in self.zone) or name in self.timeouts
        return DnsAnswer(name, rdtype, (), self.ttl, nxdomain=not exists)


def _cases():
    with open(SUITE, encoding="utf-8") as f:
        scenarios = list(yaml.safe_load_all(f))
    for scenario in scenarios:
        for name, case in scenario["tests"].items():
            yield pytest.param(scenario["zonedata"], case, id=name)


CASES = list(_cases())


def test_the_whole_suite_is_here():
    assert len(CASES) == 203


@pytest.mark.parametrize("zonedata, case", CASES)
async def test_rfc7208_case(zonedata, case):
    resolver = SuiteZone(zonedata)
    host, helo, mailfrom = str(case["host"]), str(case.get("helo") or ""), str(case.get("mailfrom") or "")
    if mailfrom:
        found = await check_mailfrom(resolver, host, mailfrom, helo, receiver=RECEIVER)
    else:
        found = await check_helo(resolver, host, helo, receiver=RECEIVER)
    allowed = case["result"] if isinstance(case["result"], list) else [case["result"]]
    assert found.result in allowed, (
        f"{case.get('spec')}: got {found.result} ({found.problem or found.mechanism}), "
        f"expected {' or '.join(allowed)}; {case.get('description', '')}")
    if "explanation" in case and found.result == "fail":
        # "DEFAULT" is the suite's name for no explanation from exp=. Compared without case:
        # v-macro-ip6 expects %{i} in the case the test wrote the client address (CAFE:BABE::1);
        # the gate has the address from its socket and writes it lower case, as RFC 7208 §7.4's
        # own examples do.
        assert (found.explanation or "DEFAULT").lower() == case["explanation"].lower()
