"""A structural parser for the DOT subset `smtpgate senders graph` prints (machine.to_dot)."""
from __future__ import annotations

import re

_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<id>[A-Za-z_][A-Za-z0-9_.]*)|(?P<num>-?\d+(?:\.\d+)?)'
                    r'|(?P<arrow>->)|(?P<punct>[{}\[\];=,]))')


def parse_dot(text: str) -> dict:
    """A small structural parser for the DOT subset we print: one digraph, node and edge
    statements with attribute lists. Raises AssertionError on anything else."""
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        assert m, f"bad DOT at {pos}: {text[pos:pos + 30]!r}"
        kind = m.lastgroup
        value = m.group(kind)
        if kind == "str":
            value = re.sub(r"\\(.)", lambda x: "\n" if x.group(1) == "n" else x.group(1), value[1:-1])
        tokens.append((kind, value))
        pos = m.end()
    it = iter(tokens)

    def take(kind=None, value=None):
        k, v = next(it)
        assert kind is None or k == kind, (k, v, kind)
        assert value is None or v == value, (k, v, value)
        return k, v

    take("id", "digraph")
    _, name = take()
    take("punct", "{")
    graph = {"name": name, "nodes": {}, "edges": [], "attrs": {}}
    k, v = take()
    while (k, v) != ("punct", "}"):
        assert k in ("id", "str"), (k, v)
        first = v
        k, v = take()
        attrs = {}
        if (k, v) == ("punct", "="):  # graph attribute: rankdir=LR;
            graph["attrs"][first] = take()[1]
            take("punct", ";")
            k, v = take()
            continue
        target = None
        if (k, v) == ("arrow", "->"):
            target = take()[1]
            k, v = take()
        if (k, v) == ("punct", "["):
            k, v = take()
            while (k, v) != ("punct", "]"):
                key = v
                take("punct", "=")
                attrs[key] = take()[1]
                k, v = take()
                if (k, v) == ("punct", ","):
                    k, v = take()
            k, v = take()
        assert (k, v) == ("punct", ";"), (k, v)
        if target is not None:
            graph["edges"].append((first, target, attrs))
        elif first not in ("node", "edge"):
            graph["nodes"][first] = attrs
        k, v = take()
    assert next(it, None) is None, "text after the closing brace"
    return graph
