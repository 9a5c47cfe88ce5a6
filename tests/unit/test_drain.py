"""The drain reads the kernel's accept queue of a socket it borrows and never closes."""

import socket
import time

import pytest

from service.drain import accept_queue

pytestmark = pytest.mark.timing  # latency or windows under load: make test-noisy runs these beside a busy core


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="Linux only")
def test_accept_queue_counts_waiting_connections_and_leaves_the_fd_open():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        assert accept_queue(server.fileno()) == 0
        clients = [socket.create_connection(server.getsockname()) for _ in range(3)]
        time.sleep(0.05)
        assert accept_queue(server.fileno()) == 3
        server.accept()[0].close()
        assert accept_queue(server.fileno()) == 2  # the fd still works: it was not closed
        for c in clients:
            c.close()
    assert accept_queue(None) == 0
