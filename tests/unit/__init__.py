"""Unit tests: modules and the plugin API in-process, no gate process (real SQLite, Redis, DNS)."""
