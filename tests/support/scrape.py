"""A gate's metrics port as a test reads it: ``get`` any path (``/healthz``, ``/metrics``),
``scrape`` the exposition's samples."""
from __future__ import annotations

import re
import urllib.error
import urllib.request

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')


def get(url: str) -> tuple[int, str]:
    try:
        with _DIRECT.open(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> dict[str, float]:
    """The exposition's samples as {'name{label="v",...}': value}, labels sorted."""
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    samples = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            labels = ",".join(sorted(re.findall(r'\w+="[^"]*"', m.group(2) or "")))
            samples[f"{m.group(1)}{{{labels}}}" if labels else m.group(1)] = float(m.group(3))
    return samples
