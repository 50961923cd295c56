"""``stores/counts.py`` on SQLite: live entries only, an absent database counts nothing, a
broken one gives None (the gauges are left out) and reports the error once."""
from __future__ import annotations

import asyncio
import time

from smtpgate.stores import Params, open_stores
from smtpgate.stores.counts import counter_for
from smtpgate.stores.senders import SenderRecord

P = Params(delay=300, retry_window=2 * 86400, pass_ttl=35 * 86400, auto_whitelist_after=0)


def test_live_entries_are_counted_by_state(tmp_path):
    url = f"sqlite://{tmp_path / 'state.db'}"
    now = time.time()

    async def fill():
        stores = open_stores(url)
        await stores.greylist.attempt("192.0.2.0/24", "a@x.test", "r@y.test", now=now, params=P)
        await stores.greylist.attempt("192.0.2.0/24", "b@x.test", "r@y.test", now=now - 600, params=P)
        await stores.greylist.attempt("192.0.2.0/24", "b@x.test", "r@y.test", now=now, params=P)
        for key, state, expires in [("a@x.test", "new", now + 60), ("b@x.test", "probation", now + 60),
                                    ("c@x.test", "new", now - 60)]:  # c has run out
            rec = SenderRecord("senders", key, state, now, now, now, expires)
            await stores.senders.update("senders", key, lambda cur, rec=rec: (rec, None), now=now - 120)
        await stores.close()
    asyncio.run(fill())

    counts = counter_for(url).read()
    assert counts.greylist == {"pending": 1, "passed": 1}
    assert counts.senders == {("senders", "new"): 1, ("senders", "probation"): 1}


def test_no_database_yet_counts_nothing_and_a_broken_one_is_an_error(tmp_path):
    errors = []
    assert counter_for(f"sqlite://{tmp_path / 'none.db'}", lambda: errors.append(1)).read().greylist == \
        {"pending": 0, "passed": 0}
    (tmp_path / "bad.db").write_bytes(b"not a database" * 400)
    assert counter_for(f"sqlite://{tmp_path / 'bad.db'}", lambda: errors.append(1)).read() is None
    assert errors == [1]
    assert counter_for("sqlite://:memory:") is None
