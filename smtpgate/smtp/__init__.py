"""SMTP: the client side (front), one session's logic (conversation), the downstream (relay)."""
