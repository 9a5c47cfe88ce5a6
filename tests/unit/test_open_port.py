"""The loud warning for a port open beyond loopback with no API key (service.service)."""

from __future__ import annotations

import logging
import socket

import pytest

from service.settings import Settings


@pytest.mark.parametrize("host, key, warns", [("0.0.0.0", "", True), ("0.0.0.0", "k", False), ("127.0.0.1", "", False)])
def test_an_open_port_without_an_api_key_is_logged_loudly(host, key, warns, caplog):
    from service.service import warn_if_open

    with socket.socket() as sock:
        sock.bind((host, 0))
        with caplog.at_level(logging.WARNING, logger="deepserve"):
            assert warn_if_open(Settings(api_key=key), sock.fileno()) is warns
    assert ("with no API key" in caplog.text) is warns
