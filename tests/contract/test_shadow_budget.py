"""Mirrors draw on the worker's shadow CPU budget: with budget to spare every request of a
100% shadow is mirrored and compared; with the budget spent every mirror is dropped at the
door (counted), and the clients' answers are the same either way."""

from __future__ import annotations

import time

from service import rollout
from service.metadata import Rollout
from service.priority import ShadowBudget
from tests.conftest import FIXTURES

SEVEN = (FIXTURES / "mnist_test0_label7.png").read_bytes()


def test_mirrors_are_admitted_within_the_shadow_cpu_budget_and_dropped_past_it(make_app):
    ip = make_app(shadow_cpu_share=64)  # as much budget as a setting allows
    core, rollouts = ip.core, ip.core.rollouts
    active = core.active["digits"]
    core.candidates["digits"] = active  # the active version as its own candidate: every row agrees
    r = Rollout(id=f"{active.version}.1", candidate=active.version, shadow=1.0, started=time.time())
    rollouts.running = {"digits": r}
    rollouts.tallies[r.id] = tally = dict.fromkeys(rollout.FIELDS, 0.0)

    def send(n: int) -> None:
        for _ in range(n):
            resp = ip.client.post("/classify", files={"image": ("7.png", SEVEN, "image/png")})
            assert resp.status_code == 200 and resp.json()["label"] == "7", resp.text
        deadline = time.monotonic() + 30
        while rollouts.inflight:  # the mirrors still running in the app's event loop
            assert time.monotonic() < deadline, "mirrors never finished"
            time.sleep(0.01)

    send(20)
    assert tally["primary_requests"] == 20 and tally["shadow_sent"] == 20
    assert tally["shadow_compared"] == 20 and tally["agree_rows"] == 20 and tally["shadow_dropped"] == 0, tally
    assert rollouts.budget.costs[active.models["digits"].name] > 0  # what a mirror costs is measured
    rollouts.budget = ShadowBudget(1e-9, burst_s=0.0)  # a spent budget
    send(20)
    assert tally["shadow_sent"] == 40 and tally["shadow_dropped"] == 20 and tally["shadow_compared"] == 20, tally
