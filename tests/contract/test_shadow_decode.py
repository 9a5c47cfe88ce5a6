"""A shadow request decodes nothing twice: the detached copy of a request that a shadow uses
reuses the images the primary decoded under the same preprocessing, decodes afresh under
another, and never touches the client's own request (its timings, its liveness)."""

import asyncio

import numpy as np

from service.app import Request
from tests.conftest import FIXTURES

SEVEN = (FIXTURES / "mnist_test0_label7.png").read_bytes()


def _request(app) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [], "client": ("127.0.0.1", 1)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    return Request(getattr(app, "deepserve", app), scope, receive)


def test_a_shadow_reuses_the_primary_decode_and_leaves_the_request_alone(inprocess):
    digits = inprocess.core.models["digits"]
    other = inprocess.core.models["fashion"].meta.preprocessing  # garment framing: decoded afresh
    req = _request(inprocess.app)
    files = [SEVEN]

    async def main():
        primary = await req.decode_images(files, digits.meta.preprocessing)
        timings = dict(req.timings)
        shadow = req.detached()
        shadow.cancelled.set()  # the shadow's copy can end without touching the client's request
        again = await shadow.decode_images(files, digits.meta.preprocessing)
        fresh = await shadow.decode_images(files, other)
        copy = await shadow.decode_images([bytes(SEVEN)], digits.meta.preprocessing)  # other files: decoded
        return primary, timings, again, fresh, copy

    primary, timings, again, fresh, copy = asyncio.run(main())
    assert again is primary  # reused, not decoded again
    assert fresh is not primary and fresh.shape == primary.shape
    assert copy is not primary and np.array_equal(copy, primary)
    assert req.timings == timings and "decode" in timings  # the client's timings are its own
    assert req.alive() and not req.cancelled.is_set()
