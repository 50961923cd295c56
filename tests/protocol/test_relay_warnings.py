"""The relay's warning lines name a failure that has no text (a bare TimeoutError) by its
name, as its "connection failed" lines and RelayErrors do (``relay.described``), not as an
empty reason: the start-up probe's and the STARTTLS fallback's."""
from __future__ import annotations

import asyncio
import dataclasses
import logging

import aiosmtplib
import pytest

from smtpgate.config import load_gate_config
from smtpgate.mail.session import Session
from smtpgate.smtp import relay
from smtpgate.smtp.relay import Downstream
from smtpgate.smtp.relay_api import Capabilities
from tests.support.downstream import CapturingDownstream

pytestmark = pytest.mark.timeout(30)


async def _timed_out(*args, **kwargs):
    raise asyncio.TimeoutError()  # no text


def _logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "smtpgate.relay"]


async def test_the_probe_names_a_failure_without_text(caplog, monkeypatch):
    monkeypatch.setattr(aiosmtplib.SMTP, "ehlo", _timed_out)
    cfg = load_gate_config(None)
    with CapturingDownstream() as ds, caplog.at_level(logging.WARNING, logger="smtpgate.relay"):
        downstream = dataclasses.replace(cfg.downstream, host=ds.host, port=ds.port)
        assert not await relay.probe(downstream, cfg.hostname, Capabilities())
    assert _logged(caplog) == [f"downstream {ds.host}:{ds.port} not answering yet "
                               "(TimeoutError); EHLO offers the safe minimum"]


async def test_the_starttls_fallback_names_a_failure_without_text(caplog, monkeypatch):
    monkeypatch.setattr(aiosmtplib.SMTP, "starttls", _timed_out)
    cfg = load_gate_config(None)
    with CapturingDownstream(replies={"EHLO": "250 downstream.test\n250 STARTTLS"}) as ds:
        down = Downstream(dataclasses.replace(cfg.downstream, host=ds.host, port=ds.port,
                                              tls="starttls"), cfg.hostname)
        try:
            with caplog.at_level(logging.WARNING, logger="smtpgate.relay"):
                async with asyncio.timeout(10):
                    await down.open(Session(id="T1", client_ip="127.0.0.1", client_port=2525,
                                            helo="client.test", esmtp=True, proto="ESMTP"))
            assert down.connected and ds.connections == 2  # plain text, on a new connection
        finally:
            await down.close()
    assert _logged(caplog) == [f"downstream {ds.host}:{ds.port}: STARTTLS failed: TimeoutError; "
                               "relaying in plain text (downstream.tls: starttls)"]
