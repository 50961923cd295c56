"""A DMARC policy record (RFC 7489 §6.3): ``v=DMARC1; p=reject; sp=none; pct=50; ...``."""
from __future__ import annotations

from dataclasses import asdict, dataclass

POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class Record:
    """The tags that decide (``p``, ``sp``, ``pct``, ``adkim``, ``aspf``) and those an
    aggregate report would need (``rua``, ``ruf``, ``fo``, ``ri``)."""

    p: str
    sp: str | None = None
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: str | None = None
    ruf: str | None = None
    fo: str = "0"
    ri: int = 86400

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse(text: str) -> Record | None:
    """The record, or None when ``text`` is not a usable DMARC record (§6.6.3: such records
    are ignored). A bad ``p`` with a ``rua`` reads as ``p=none`` (§6.6.3 step 6)."""
    tags: dict[str, str] = {}
    parts = [p.strip() for p in text.split(";")]
    if not parts or parts[0].replace(" ", "") != "v=DMARC1":
        return None
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if eq and name and name not in tags:
            tags[name] = value.strip()
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        if not tags.get("rua"):
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    pct = tags.get("pct", "100")
    ri = tags.get("ri", "86400")
    return Record(p, sp if sp in POLICIES else None,
                  min(100, int(pct)) if pct.isdigit() else 100,
                  "s" if tags.get("adkim", "").lower() == "s" else "r",
                  "s" if tags.get("aspf", "").lower() == "s" else "r",
                  tags.get("rua") or None, tags.get("ruf") or None, tags.get("fo", "0") or "0",
                  int(ri) if ri.isdigit() else 86400)
