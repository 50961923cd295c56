"""First-party rules. Each module here uses only smtpgate's public API, like a user's plugin,
and registers through the ``smtpgate.rules`` entry-point group in pyproject.toml."""
