"""The cyclic garbage collector's settings for a serving worker (issue 13).

What a worker loads (configuration, policies, compiled patterns, libraries) lives as long
as the worker. A finished connection is freed by reference counting (``smtp/front.py``
breaks its cycles when it ends), but a relayed message still leaves some cyclic garbage,
and at CPython's default gen-0 threshold (700 net allocations) the gate collected about once
per 8 messages with 50 sessions at once, its gen-1 and gen-2 passes walking the live
sessions and everything loaded again. So, once loaded:

- ``gc.freeze()`` moves what exists into the permanent generation, which no collection
  scans again (it also spares the copy-on-write pages of forked workers);
- a gen-0 threshold of ``GEN0_THRESHOLD`` collects cycles ~14 times less often. Cycles are
  still collected, so memory stays bounded: at most a threshold's worth of cyclic garbage
  (a few MB) waits for its collection. 5,000 and 20,000 measured alike, 10,000 sits
  between them; 50,000 cost more per message again (each pass walks more objects than the
  caches hold): bench/README.md, "Garbage collection".
"""
from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000
OLDER_THRESHOLDS = (20, 20)  # gen 1 after 20 gen-0 passes, gen 2 after 20 gen-1 passes


def settle_for_serving() -> None:
    """Call once what the worker serves with is loaded, before its first connection, and
    again after a reload. Frozen objects are still freed by reference counting; only
    garbage cycles among them would stay. None exist at start-up (no session yet, and the
    garbage of the loading is collected first); a reload may freeze the cycles of sessions
    in flight, so it unfreezes first: the next reload collects what those left, and at
    most one reload's worth is ever held."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *OLDER_THRESHOLDS)
