"""First-party rules, written exactly as a user's plugin: one module or package per rule.

Each uses only smtpgate's public API and registers through the ``smtpgate.rules``
entry-point group in pyproject.toml; a package's ``__init__.py`` holds its Rule class.
"""
