"""``smtpgate state copy FROM-URL TO-URL``: copy the gate's state between stores — SQLite to
Redis when a second gate joins, Redis back to SQLite, one Redis to another.

The URLs are written as gate.yaml's ``state:`` (relative SQLite paths against the current
folder); gate.yaml itself is not needed. Every kind of state the stores keep is copied
(``smtpgate.stores.portable``), with its times and expiries; the counts are printed.

Exit status: 0 copied, 1 a store failed (part of the state may be copied: running it again
is harmless), 2 bad arguments (a URL that does not parse, a missing SQLite source, the
same store twice).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time

from .common import UsageError, answer, json_parent


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("state", parents=[common], help="the state store: copy it to another")
    ssub = s.add_subparsers(dest="state_command", metavar="COMMAND", required=True)
    p = ssub.add_parser("copy", parents=[common, json_parent()],
                        help="copy greylist and sender state from one store to another")
    p.add_argument("source", metavar="FROM-URL", help="sqlite:///PATH, redis://…, unix:///PATH/TO/redis.sock, rediss://…, redis+sentinel://…")
    p.add_argument("target", metavar="TO-URL", help="the same forms")


def state_command(args, config_path: str | None) -> int:
    return answer(f"state {args.state_command}", lambda: _copied(args.source, args.target), args.json,
                  ascii_json=True)


def _copied(source_text: str, target_text: str) -> tuple[dict, str]:
    source, target = _urls(source_text, target_text)
    counts = asyncio.run(_copy(source, target))
    shown_source, shown_target = _shown(source), _shown(target)
    doc = {"from": shown_source, "to": shown_target,
           "copied": {part: dict(sorted(c.items())) for part, c in counts.items()}}
    text = "\n".join([f"copied {shown_source} -> {shown_target}",
                      *(f"  {part}: {_describe(part, c)}" for part, c in counts.items())])
    return doc, text


def _urls(source_text: str, target_text: str) -> tuple[str, str]:
    from ..config.gate import sqlite_path, state_url
    urls = []
    for name, text in (("FROM-URL", source_text), ("TO-URL", target_text)):
        try:
            urls.append(state_url(text, os.getcwd()))
        except ValueError as e:
            raise UsageError(f"{name}: {e}") from None
    source, target = urls
    if source == target:
        raise UsageError("FROM-URL and TO-URL name the same store")
    path = sqlite_path(source)
    if path is not None and path != ":memory:" and not os.path.isfile(path):
        raise UsageError(f"FROM-URL: no such file: {path}")  # never copy from a new empty file
    return source, target


async def _copy(source_url: str, target_url: str):
    from ..stores import open_stores
    from ..stores.portable import copy_state
    source, target = open_stores(source_url), open_stores(target_url)
    try:
        return await copy_state(source, target, time.time())
    finally:
        await source.close()
        await target.close()


def _shown(url: str) -> str:
    from ..stores.redis_url import is_redis_url, redact
    return redact(url) if is_redis_url(url) else url


def _describe(part: str, counts) -> str:
    order = ["pending", "passed", "expired", "allow", "records"]
    words = {"allow": "allow entries"}
    shown = [f"{counts[k]} {words.get(k, k)}" for k in order if counts.get(k)]
    shown += [f"{n} {k}" for k, n in sorted(counts.items()) if k not in order and k != "skipped" and n]
    text = ", ".join(shown) or "nothing"
    if counts.get("skipped"):
        text += f" ({counts['skipped']} expired for good, not copied)"
    return text
