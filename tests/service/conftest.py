"""The real-server fixtures live in tests/conftest.py (one session server for every folder);
re-exported here for the modules that import them from this folder."""

from tests.conftest import Server, free_port

__all__ = ["Server", "free_port"]
