"""The ``smtpgate`` command: main.py parses and dispatches, one module per subcommand."""
