"""Our own error types. Errors of the libraries below are translated into these at one boundary."""
from __future__ import annotations


class SmtpgateError(Exception):
    """Base of every error smtpgate raises on purpose."""


class ConfigError(SmtpgateError):
    """One or more problems in gate.yaml or a policy file.

    Each problem is a ``Problem`` carrying ``file:line:col: message``; ``str()`` lists them
    one per line, the format ``check-config`` prints.
    """

    def __init__(self, problems: "list[Problem] | Problem | str"):
        if isinstance(problems, (str, Problem)):
            problems = [problems if isinstance(problems, Problem) else Problem(None, None, None, problems)]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class Problem:
    """A located message: ``policies/example.com.yaml:12:7: rules[1].greylist.delay: ...``."""

    __slots__ = ("file", "line", "col", "message")

    def __init__(self, file: str | None, line: int | None, col: int | None, message: str):
        self.file, self.line, self.col, self.message = file, line, col, message

    def __str__(self) -> str:
        where = [str(x) for x in (self.file, self.line, self.col) if x is not None]
        return f"{':'.join(where)}: {self.message}" if where else self.message

    def __repr__(self) -> str:
        return f"Problem({str(self)!r})"


class PluginError(SmtpgateError):
    """A rule plugin that cannot be loaded: bad hook, signature, options or duplicate name."""


class OptionError(SmtpgateError):
    """A rule option value that does not fit its declaration; ``key`` names the option."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class StoreError(SmtpgateError):
    """A state store (SQLite, Redis, Maildir) failed."""


class RelayError(SmtpgateError):
    """The downstream could not be reached or failed mid-transaction.

    ``reply`` is what the client is told (always a 4xx, never 250)."""

    def __init__(self, message: str, reply: "object | None" = None):
        super().__init__(message)
        self.reply = reply


class LeakedConnectionError(SmtpgateError):
    """A ``ConnectionError`` out of a conversation step (the relay, a rule, a store), which
    should have been translated there. Never the client's connection, which only the front
    reads and writes: aiosmtpd takes any ConnectionError for the client gone and closes its
    connection without a reply or a log line, so this is raised instead; the front then
    logs it and answers 451 4.3.0, as for any local error, and the session goes on."""
