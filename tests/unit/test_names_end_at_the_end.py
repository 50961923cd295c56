"""Names checked with a pattern end where the text ends: a trailing newline (which ``$``
lets through) is refused, so it can never reach a header or a log line (header names:
tests/unit/test_message.py, tests/rules/test_dmarc.py)."""
import pytest

from smtpgate import Machine
from smtpgate.machines.machine import MachineError
from smtpgate.pipeline.results import Results, check_event_name


def test_an_event_name_with_a_trailing_newline_is_refused():
    assert check_event_name("listed") == "listed"
    with pytest.raises(ValueError):
        check_event_name("listed\n")


@pytest.mark.parametrize("method, prop", [("dkim\n", "header_d"), ("dkim", "header_d\n")])
def test_an_authentication_method_or_property_with_a_trailing_newline_is_refused(method, prop):
    with pytest.raises(ValueError):
        Results().auth("r", method, "pass", **{prop: "example.org"})


@pytest.mark.parametrize("name, state", [("m\n", "new"), ("m", "new\n")])
def test_a_machine_or_state_name_with_a_trailing_newline_is_refused(name, state):
    with pytest.raises(MachineError):
        Machine(name, {state: {}}, initial=state)
