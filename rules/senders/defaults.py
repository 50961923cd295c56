"""The default sender machine (``senders: {}``), exactly as docs/rules/senders.md prints it.

new -> probation on a delivery; probation -> trusted after 5 deliveries over at least a
day; trusted skips greylisting. Bad events (rules' refusals, banned attachments, block-list
hits, downstream refusals) lead to suspect, and repeated ones from suspect to blocked,
which refuses at MAIL. Every state but new decays back one step when the sender goes quiet.
"""
from __future__ import annotations

DEFAULT_INITIAL = "new"

_BAD = {
    "rejected": {"to": "suspect", "count": 2, "within": "1d"},
    "banned_attachment": "suspect",
    "dnsbl_listed": "suspect",
    "downstream_rejected": {"to": "suspect", "count": 3, "within": "1d"},
}

DEFAULT_STATES = {
    "new": {
        "events": {"delivered": "probation", **_BAD},
    },
    "probation": {
        "ttl": "30d", "decay_to": "new",
        "events": {"delivered": {"to": "trusted", "count": 5, "within": "30d", "min_time": "1d"}, **_BAD},
    },
    "trusted": {
        "skip": ["greylist"],
        "ttl": "60d", "decay_to": "probation",
        "events": {
            "rejected": {"to": "suspect", "count": 3, "within": "1d"},
            "banned_attachment": "suspect",
            "dnsbl_listed": {"to": "suspect", "count": 2, "within": "1d"},
            "downstream_rejected": {"to": "suspect", "count": 5, "within": "1d"},
        },
    },
    "suspect": {
        "add_header": "X-Smtpgate-Sender: suspect",
        "ttl": "14d", "decay_to": "new",
        "events": {
            "delivered": {"to": "probation", "count": 5, "within": "7d", "min_time": "2d"},
            "rejected": {"to": "blocked", "count": 3, "within": "1d"},
            "banned_attachment": {"to": "blocked", "count": 2, "within": "7d"},
            "dnsbl_listed": {"to": "blocked", "count": 3, "within": "1d"},
            "downstream_rejected": {"to": "blocked", "count": 5, "within": "1d"},
        },
    },
    "blocked": {
        "reject": "554 5.7.1 Sender {key} is blocked by local policy",
        "ttl": "7d", "decay_to": "suspect",
    },
}
