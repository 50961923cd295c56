#!/usr/bin/env python3
"""The benchmark's Redis chores: is it there, and forget the keys of one run.

    redisctl.py ping URL          exit 0 when Redis answers; prints its version
    redisctl.py clean URL PREFIX  delete every key starting with PREFIX (SCAN, never FLUSHDB)
"""
import sys

import redis


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[1] not in ("ping", "clean"):
        print(__doc__, file=sys.stderr)
        return 2
    url = sys.argv[2].split("?", 1)[0]
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        if sys.argv[1] == "ping":
            client.ping()
            print(client.info("server").get("redis_version", "?"))
            return 0
        prefix = sys.argv[3]
        if not prefix:
            print("redisctl.py clean: an empty prefix would delete every key", file=sys.stderr)
            return 2
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
        deleted = 0
        batch = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) == 500:
                deleted += client.delete(*batch)
                batch = []
        if batch:
            deleted += client.delete(*batch)
        print(f"deleted {deleted} key(s) under {prefix!r}")
        return 0
    except redis.RedisError as e:
        print(f"redis at {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
