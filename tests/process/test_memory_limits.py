"""limits.max_line_length and limits.max_inflight_data against the real gate and the capture
downstream (issue 10 §2 and §4). Memory figures themselves are measured by bench/memory_bench.py,
never asserted here."""
from __future__ import annotations

from tests.process.test_limits import BODY, FROM, RCPT, assert_enhanced, downstream_idle, ds_commands, greeted


def message_with_line(length: int) -> bytes:
    return b"Subject: long line\r\n\r\n" + b"x" * length + b"\r\nend\r\n"


def start_data(c, size: int | None = None) -> tuple[int, bytes]:
    code, text = c.cmd(f"MAIL FROM:<{FROM}>" + (f" SIZE={size}" if size else ""))
    assert code == 250, text
    code, text = c.cmd(f"RCPT TO:<{RCPT}>")
    assert code == 250, text
    return c.cmd("DATA")


# ---------------------------------------------------------------------------- line length
def test_line_of_998_octets_is_relayed_and_999_is_refused_without_a_final_dot(gate_factory, downstream):
    gate = gate_factory()  # the default limit: 998 octets before CRLF
    with greeted(gate) as c:
        c.ehlo()
        code, text = c.message(message_with_line(999))
        assert (code, text[:10]) == (500, b"500 5.5.2 "), text
        code, text = c.message(message_with_line(998))  # the session goes on
        assert text.startswith(b"250 2.0.0"), text
        c.quit()
    assert_enhanced(c)
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == message_with_line(998)
    downstream_idle(downstream)
    assert ds_commands(downstream).count(b"DATA") == 1  # the refused one never got to DATA
    assert not downstream.rejected and not downstream.aborted


def test_a_stuffed_dot_does_not_count_and_a_long_line_split_across_reads_is_seen(gate_factory, downstream):
    gate = gate_factory(config={"limits": {"max_line_length": 100}})
    with greeted(gate) as c:
        c.ehlo()
        # 100 octets once un-stuffed: within the limit
        code, text = start_data(c)
        assert code == 354, text
        c.send(b"Subject: s\r\n\r\n.." + b"y" * 99 + b"\r\n.\r\n")
        code, text = c.reply("DATA_END")
        assert text.startswith(b"250 2.0.0"), text
        # 101 octets, sent in small writes
        code, text = start_data(c)
        assert code == 354, text
        for part in (b"Subject: s\r\n\r\n", b"z" * 60, b"z" * 41, b"\r\n.\r\n"):
            c.send(part)
        code, text = c.reply("DATA_END")
        assert (code, text[:10]) == (500, b"500 5.5.2 "), text
        c.quit()
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == b"Subject: s\r\n\r\n." + b"y" * 99 + b"\r\n"
    downstream_idle(downstream)
    assert len(downstream.messages) == 1


def test_max_line_length_0_turns_the_check_off(gate_factory, downstream):
    gate = gate_factory(config={"limits": {"max_line_length": 0}})
    with greeted(gate) as c:
        c.ehlo()
        code, text = c.message(message_with_line(5000))
        assert text.startswith(b"250 2.0.0"), text
        c.quit()
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == message_with_line(5000)


# ---------------------------------------------------------------------------- in-flight budget
BUDGET = {"limits": {"max_inflight_data": "1MB"}}


def test_data_past_the_inflight_budget_gets_452_and_the_others_are_served(gate_factory, downstream):
    gate = gate_factory(config=BUDGET)
    body = b"Subject: big\r\n\r\n" + (b"b" * 78 + b"\r\n") * 5000  # 400 KB
    clients = [greeted(gate) for _ in range(4)]
    try:
        for c in clients:
            c.ehlo()
        # SIZE= reserves at DATA: two 450 KB messages fit in 1 MB, a third does not
        answers = [start_data(c, size=450_000) for c in clients]
        assert [code for code, _ in answers] == [354, 354, 452, 452], answers
        assert answers[2][1].startswith(b"452 4.3.1 "), answers[2]
        for c in clients[:2]:
            c.send(body + b".\r\n")
            code, text = c.reply("DATA_END")
            assert text.startswith(b"250 2.0.0"), text
        # the budget is free again: the refused ones retry in the same transaction
        for c in clients[2:]:
            code, text = c.cmd("DATA")
            assert code == 354, text
            c.send(body + b".\r\n")
            code, text = c.reply("DATA_END")
            assert text.startswith(b"250 2.0.0"), text
        for c in clients:
            c.quit()
    finally:
        for c in clients:
            c.close()
    assert_enhanced(*clients)
    assert "DATA refused" in gate.log_text() and "Traceback" not in gate.log_text()
    msgs = downstream.wait_for_messages(4)
    assert all(m.data == body for m in msgs)


def test_a_message_growing_past_the_budget_gets_452_after_the_dot(gate_factory, downstream):
    gate = gate_factory(config=BUDGET)
    with greeted(gate) as holder, greeted(gate) as grower:
        holder.ehlo()
        grower.ehlo()
        code, text = start_data(holder, size=600_000)  # holds 600 KB of the budget
        assert code == 354, text
        code, text = start_data(grower)  # no SIZE=: charged as it grows
        assert code == 354, text
        grower.send(b"Subject: grows\r\n\r\n" + (b"g" * 78 + b"\r\n") * 7000 + b".\r\n")  # 560 KB
        code, text = grower.reply("DATA_END")
        assert (code, text[:10]) == (452, b"452 4.3.1 "), text
        holder.send(BODY + b".\r\n")
        code, text = holder.reply("DATA_END")
        assert text.startswith(b"250 2.0.0"), text
        code, text = grower.message(BODY)  # the gate and the session are still fine
        assert text.startswith(b"250 2.0.0"), text
        holder.quit()
        grower.quit()
    assert gate.is_running()
    assert len(downstream.wait_for_messages(2)) == 2
    downstream_idle(downstream)
    assert ds_commands(downstream).count(b"DATA") == 2


# ---------------------------------------------------------------------------- configuration
def test_the_new_limits_read_from_gate_yaml(tmp_path):
    from smtpgate.config.gate import load_gate_config

    path = tmp_path / "gate.yaml"
    path.write_text("limits: {max_line_length: 2000, max_inflight_data: 200MB}\n")
    limits = load_gate_config(str(path)).limits
    assert (limits.max_line_length, limits.max_inflight_data) == (2000, 200_000_000)
    path.write_text("limits: {max_line_length: 0, max_inflight_data: 0}\n")  # 0: off
    limits = load_gate_config(str(path)).limits
    assert (limits.max_line_length, limits.max_inflight_data) == (0, 0)
    default = load_gate_config(None).limits  # auto: a quarter of RAM, at most 1GB
    assert default.max_line_length == 998 and 0 < default.max_inflight_data <= 1_000_000_000


def test_bad_new_limits_are_reported_with_file_and_line(tmp_path):
    from smtpgate.config.gate import load_gate_config
    from smtpgate.errors import ConfigError

    path = tmp_path / "gate.yaml"
    path.write_text("limits:\n  max_line_length: 10\n  max_inflight_data: lots\n")
    try:
        load_gate_config(str(path))
    except ConfigError as e:
        text = str(e)
    else:
        raise AssertionError("bad limits were accepted")
    assert ("gate.yaml:2:20: limits.max_line_length: expected a number of octets of 78 or more, "
            "or 0 for no limit, got 10") in text, text
    assert """gate.yaml:3:22: limits.max_inflight_data: expected "auto", a size like "512MB", """ \
           """or 0 for no limit, got 'lots'""" in text, text
