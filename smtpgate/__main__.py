"""``python -m smtpgate``: the ``smtpgate`` command."""
from .cli.main import main

raise SystemExit(main())
