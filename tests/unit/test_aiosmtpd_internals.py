"""The aiosmtpd internals the front relies on (front.py's docstring), checked against the
installed aiosmtpd: a release that changes them fails here, by name, rather than quietly
(a timer per command again, a timer that outlives its connection, the log check skipped).
pyproject.toml leaves aiosmtpd unpinned above, so CI's fresh install runs these on each
new release."""
import collections
import dis
import inspect
import re
import types

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP

from smtpgate.smtp import front
from smtpgate.smtp.front import GateSMTP


def globals_loaded(code: types.CodeType) -> collections.Counter:
    """The global names the code looks up where it runs (how many places), its
    comprehensions' included."""
    names = collections.Counter(
        i.argval for i in dis.get_instructions(code) if i.opname == "LOAD_GLOBAL")
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += globals_loaded(const)
    return names


def test_every_timer_reset_goes_through_reset_timeout():
    """GateSMTP overrides _reset_timeout to reset its one IdleTimer, which calls aiosmtpd's
    _timeout_cb after _timeout_duration: aiosmtpd must still call it (per command, at
    connect, after PROXY), with an optional duration."""
    assert list(inspect.signature(SMTP._reset_timeout).parameters) == ["self", "duration"]
    assert list(inspect.signature(SMTP._timeout_cb).parameters) == ["self"]
    assert "_timeout_duration" in SMTP.__init__.__code__.co_names
    assert "_reset_timeout" in GateSMTP.__dict__
    for method in (SMTP._handle_client, SMTP.connection_made):
        assert "_reset_timeout" in method.__code__.co_names, method.__name__


def test_the_timer_handle_is_only_cancelled_elsewhere():
    """GateSMTP puts an IdleTimer (reset, cancel, close) in _timeout_handle: outside
    SMTP.__init__ (which sets it to None first) and _reset_timeout (overridden), aiosmtpd
    may only cancel it (connection_lost does) or check that it is set."""
    init = inspect.getsource(SMTP.__init__)
    assert init.count("_timeout_handle") == len(
        re.findall(r"self\._timeout_handle\b[^=\n]*= None\n", init)) == 1
    source = inspect.getsource(aiosmtpd.smtp)
    for own in (SMTP.__init__, SMTP._reset_timeout):
        source = source.replace(inspect.getsource(own), "")
    allowed = re.findall(r"self\._timeout_handle(?:\.cancel\(\)| is not None)", source)
    assert len(allowed) == source.count("_timeout_handle")
    assert "self._timeout_handle.cancel()" in inspect.getsource(SMTP.connection_lost)


def test_the_command_loop_logs_through_the_module_global():
    """The front replaces aiosmtpd.smtp.sanitized_log: the command loop must look it up as a
    module global at each of its two calls per line (not bind it at import); the original
    masks through the module global sanitize (test_front_command_log counts its calls)."""
    assert front._aiosmtpd_sanitized_log.__module__ == "aiosmtpd.smtp"
    assert globals_loaded(SMTP._handle_client.__code__)["sanitized_log"] >= 2  # debug, info
    assert "sanitize" in globals_loaded(front._aiosmtpd_sanitized_log.__code__)


def test_the_handler_hooks_are_read_from_handle_hooks_and_never_written_after_init():
    """GateSMTP hands aiosmtpd one shared hook table (``_HANDLE_HOOKS``: PROXY) in place of
    its per-connection scan of the handler: aiosmtpd must look hooks up there, and only its
    __init__ (which GateSMTP's runs after) may assign or change it."""
    assert "_handle_hooks" in SMTP._call_handler_hook.__code__.co_names
    for name, member in inspect.getmembers(SMTP, inspect.isfunction):
        stores = {i.argval for i in dis.get_instructions(member) if i.opname == "STORE_ATTR"}
        if name != "__init__":
            assert "_handle_hooks" not in stores, name
    assert front.GateSMTP.__init__.__code__.co_names.count("_handle_hooks") == 1
    assert front._HANDLE_HOOKS == {"PROXY": front._HANDLER.handle_PROXY}
    assert dir(front._HANDLER) == []  # aiosmtpd's scan finds nothing to build per connection
