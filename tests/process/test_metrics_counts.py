"""``/metrics`` entry counts of the state: live greylist triplets by state and sender records
by machine and state, counted by the process serving the scrape, on both backends; a dead
Redis leaves them out and counts a store error instead of holding the scrape."""
from __future__ import annotations

import pytest

from tests.process.test_greylist_process import send
from tests.support import redisproc
from tests.support.gateproc import free_port, wait_until
from tests.support.scrape import get, scrape

POLICIES = {"default.yaml": "domains: [example.com]\nrules:\n  - senders: {}\n  - greylist: {delay: 2s}\n"}


def entries(samples: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in samples.items()
            if k.startswith(("smtpgate_greylist_entries", "smtpgate_sender_entries"))}


@pytest.mark.timeout(90)
def test_one_pending_and_one_passed_triplet_are_counted(state_url, gate_factory, downstream, gate_clock):
    mport = free_port()
    gate = gate_factory(policies=POLICIES, env=gate_clock.env,
                        config={"workers": 2, "metrics": f"127.0.0.1:{mport}", "state": state_url})
    assert wait_until(lambda: get(f"http://127.0.0.1:{mport}/healthz")[0] == 200, 20)
    assert send(gate, "alice@sender.test")[0] == 451
    gate_clock.advance(3)
    assert send(gate, "alice@sender.test") == (250, "")  # alice's triplet passed
    assert send(gate, "carol@sender.test")[0] == 451     # carol's waits
    downstream.wait_for_messages(1)
    want = {'smtpgate_greylist_entries{state="pending"}': 1, 'smtpgate_greylist_entries{state="passed"}': 1}
    # SQLite is counted by the scrape itself; Redis in the background, at the first scrape
    assert wait_until(lambda: want.items() <= entries(scrape(mport)).items(), 20), entries(scrape(mport))
    senders = {k: v for k, v in entries(scrape(mport)).items() if k.startswith("smtpgate_sender_entries")}
    assert senders == {'smtpgate_sender_entries{machine="senders",state="probation"}': 1,  # alice delivered
                       'smtpgate_sender_entries{machine="senders",state="new"}': 1}, senders
    assert scrape(mport)["smtpgate_store_errors_total"] == 0
    assert gate.stop() == 0


@pytest.mark.timeout(60)
def test_a_dead_redis_leaves_the_counts_out_and_counts_a_store_error(gate_factory):
    mport = free_port()
    gate_factory(config={"workers": 2, "metrics": f"127.0.0.1:{mport}",
                         "state": redisproc.UNREACHABLE_REDIS_URL})
    assert wait_until(lambda: get(f"http://127.0.0.1:{mport}/healthz")[0] == 200, 20)
    assert wait_until(lambda: scrape(mport).get("smtpgate_store_errors_total", 0) >= 1, 20)
    samples = scrape(mport)
    assert entries(samples) == {} and "smtpgate_connections_open" in samples
