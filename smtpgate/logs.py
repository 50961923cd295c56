"""Logging set-up: text (key=value) or JSON lines on stderr, one line per transaction.

A field value may be a ``LogField``: the formatter that writes the line asks it for what it
needs (``text()`` or ``json()``), so the transaction line builds only one of the two.
"""
from __future__ import annotations

import json
import logging
import sys
import time


class LogField:
    """A log field rendered on demand: ``text()`` for the key=value line (None: left out),
    ``json()`` for the JSON line (JSON-friendly values)."""

    def text(self) -> str | None:
        raise NotImplementedError

    def json(self):
        raise NotImplementedError


def _json_default(value):
    return value.json() if isinstance(value, LogField) else str(value)


def _summary(rules: list[dict]) -> str:
    return ",".join(f"{r['rule']}:{r['stage']}:{'shadow-' if r.get('shadow') else ''}{r['action']}"
                    for r in rules)


def _results(results: dict) -> str:
    """``spf:pass,dnsbl:fail``: each rule's record in one word (see pipeline/results.py)."""
    out = []
    for rule, record in results.items():
        word = next((k for k in ("fail", "err", "pass", "skip") if record.get(k)), None)
        if word:
            out.append(f"{rule}:{'shadow-' if record.get('shadow') else ''}{word}")
    return ",".join(out)


_SUMMED = ("rules", "results")  # keys whose list / dict value the text line sums up


def _text_value(key: str, value) -> str | None:
    """A field's value as written in the text line; None: left out."""
    if value == []:
        return None
    if isinstance(value, LogField):
        text = value.text()
        return str(text) if text else None
    if key == "rules":
        return _summary(value)
    if key == "results":
        return _results(value) or None
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def _quoted(value: str) -> str:
    """``json.dumps(value)``, without its encoder for the usual printable ASCII text (which
    it would only wrap in quotes: nothing in it needs an escape)."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return json.dumps(value)


class TextFormatter(logging.Formatter):
    _second, _stamp = -1, ""  # the last second formatted: most lines share it with the one before

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        stamp = self._stamp
        head = f"{stamp}Z {record.levelname.lower()} {record.name}"
        fields = getattr(record, "fields", None)
        if fields is None:
            text = f"{head} {record.getMessage()}"
        else:
            parts = []
            for key, value in fields.items():
                if value is None:
                    continue
                if value.__class__ is not str or key in _SUMMED:  # a plain text is the usual value
                    value = _text_value(key, value)
                    if value is None:
                        continue
                parts.append(f"{key}={_quoted(value) if (' ' in value or not value) else value}")
            text = f"{head} {record.getMessage()} {' '.join(parts)}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=_json_default)


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # No formatter here reads the caller's file and line, the thread or the process of a
    # record: the logging module need not look them up for every line (its HOWTO's advice).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # aiosmtpd logs every command at INFO; keep its chatter for debugging only.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))
