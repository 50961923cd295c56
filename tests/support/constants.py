"""Values more than one test module relies on, defined once."""
from __future__ import annotations

from pathlib import Path

from smtpgate.testing import FakeClock

LOOPBACK = "127.0.0.1"          # every helper server and the gate listen here
T0 = FakeClock().now()          # where a FakeClock starts (2026-01-01T00:00:00Z): times in tests count from it
START_TIMEOUT = 20.0            # seconds for a child process (gate, Postfix) to listen: imports, plugins, SQLite
STOP_TIMEOUT = 10.0             # seconds between SIGTERM and SIGKILL when a test stops a child

ROOT = Path(__file__).resolve().parents[2]                # the repository
DATA = ROOT / "tests" / "data"  # corpus, SPF suite, plugins
CORPUS = DATA / "corpus"        # third-party messages with their licences (its README)
PLUGINS = DATA / "plugins"      # the rule plugins process tests load: gate_factory(plugins=[PLUGINS / "crasher.py"])
EXAMPLE_PLUGIN = ROOT / "examples" / "plugins" / "subject_words.py"   # the documented example, loaded as a user would
