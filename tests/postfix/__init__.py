"""Postfix tests: the gate in front of a private Postfix instance."""
