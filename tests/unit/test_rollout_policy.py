"""The rollout's arithmetic and its manifest changes: comparisons per task, the policy's
verdict, sticky canary points, and a decision that only one of many deciders can write."""

import json
import shutil
import threading

import numpy as np
import pytest

from service import repository, rollout
from service.metadata import Rollout, RolloutPolicy
from tests.conftest import EXPORTED


def _row(index, confidence, ood=None):
    r = {"index": index, "confidence": confidence}
    if ood is not None:
        r["in_distribution"] = ood
    return r


def test_classifier_answers_compare_by_label_confidence_and_ood_verdict():
    primary = [_row(7, 0.9, True), _row(1, 0.8, True), _row(3, 0.6, False)]
    shadow = [_row(7, 0.7, True), _row(2, 0.5, False), _row(3, 0.6, False)]
    got = rollout.compare("image-classification", primary, shadow, 20.0)
    assert got["compared_rows"] == 3 and got["agree_rows"] == 2
    assert got["confidence_delta_sum"] == pytest.approx(0.5) and got["ood_flips"] == 1
    # /v2 answers: raw tensors, compared by their argmax
    v2 = rollout.compare(
        "image-classification",
        {"logits": np.array([[0, 5.0], [3.0, 1]])},
        {"logits": np.array([[0, 1.0], [0.0, 1]])},
        20.0,
    )
    assert v2 == {"compared_rows": 2, "agree_rows": 1}


def test_image_answers_compare_by_psnr():
    rng = np.random.default_rng(0)
    a = rng.random((4, 28, 28)).astype(np.float32)
    b = a.copy()
    b[1] = np.clip(b[1] + 0.3, 0, 1)  # one image far off
    got = rollout.compare("conditional-image-generation", a, b, 20.0)
    assert got["compared_rows"] == 4 and got["agree_rows"] == 3 and got["psnr_rows"] == 4
    assert got["psnr_sum"] / 4 < rollout.PSNR_CAP  # the far one pulls the mean down
    assert rollout.psnr(a[:1], a[:1])[0] == rollout.PSNR_CAP
    noisy = rollout.psnr(a[:1], np.clip(a[:1] + 0.1, 0, 1))[0]
    assert 15 < noisy < 25  # 0.1 off in [0, 1] is about 20 dB
    v2 = rollout.compare("image-denoising", {"image_out": a[:, None]}, {"image_out": b[:, None]}, 20.0)
    assert v2["agree_rows"] == 3


def _tally(**kw):
    t = dict.fromkeys(rollout.FIELDS, 0.0)
    t.update(kw)
    return t


def _rollout(**policy):
    return Rollout(id="r1", candidate="v2", started=0.0, policy=RolloutPolicy(**policy))


def test_the_policy_waits_for_evidence_then_promotes_or_rolls_back_with_its_reason():
    r = _rollout(min_requests=100, min_agreement=0.9, max_latency_ratio=1.5, max_error_rate_increase=0.01)
    base = {"primary_requests": 500, "primary_rows": 500, "primary_compute_s": 0.5, "candidate_rows": 100}
    assert rollout.judge(r, _tally(**base, shadow_compared=99, compared_rows=99, agree_rows=99)) is None
    ok = _tally(**base, shadow_compared=100, compared_rows=100, agree_rows=95, candidate_compute_s=0.1)
    assert rollout.judge(r, ok)[0] == "promoted"
    bad = _tally(**base, shadow_compared=100, compared_rows=100, agree_rows=50, candidate_compute_s=0.1)
    decision, why = rollout.judge(r, bad)
    assert decision == "rolled_back" and "agreement 0.5000 < 0.9" in why
    slow = _tally(**base, canary_requests=100, candidate_requests=100, candidate_compute_s=0.2)
    decision, why = rollout.judge(r, slow)
    assert decision == "rolled_back" and "latency ratio 2.00" in why
    failing = _tally(**base, canary_requests=100, candidate_requests=100, candidate_errors=5, candidate_compute_s=0.1)
    assert "error rate" in rollout.judge(r, failing)[1]
    assert rollout.judge(Rollout(id="r", candidate="v", started=0), ok) is None  # no policy: an operator decides


def test_canary_points_are_sticky_per_client_and_rollout_and_spread_evenly():
    points = [rollout.canary_point("r1", f"client-{i}") for i in range(4000)]
    assert points == [rollout.canary_point("r1", f"client-{i}") for i in range(4000)]  # sticky
    assert 0.23 < np.mean(np.array(points) < 0.25) < 0.27  # a 25% canary gets about 25% of clients
    other = [rollout.canary_point("r2", f"client-{i}") for i in range(4000)]
    assert np.corrcoef(points, other)[0, 1] < 0.1  # a new rollout draws its clients afresh


@pytest.fixture
def model_dir(tmp_path):
    root = tmp_path / "exported"
    shutil.copytree(EXPORTED, root, ignore=shutil.ignore_patterns(".status", ".manifest.lock"))
    return root


def test_a_rollout_is_decided_once_however_many_workers_try(model_dir):
    fam = repository.raw(model_dir)["families"]["digits"]
    active, previous = fam["active"], fam["previous"]
    repository.set_candidate(model_dir, "digits", previous)
    spec = _rollout(min_requests=1).model_copy(update={"candidate": previous}).model_dump(exclude_none=True)
    repository.start_rollout(model_dir, "digits", spec)
    wins, conflicts = [], []

    def decide(i):
        try:
            repository.decide_rollout(model_dir, "digits", "r1", "promoted", f"worker {i}", {"n": i})
            wins.append(i)
        except repository.Conflict:
            conflicts.append(i)

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(conflicts) == 7
    after = repository.read(model_dir).families["digits"]
    assert after.active == previous and after.previous == active and after.candidate is None
    assert after.rollout.state == "promoted" and after.rollout.reason == f"worker {wins[0]}"


def test_the_manifest_refuses_an_inconsistent_rollout(model_dir):
    fam = repository.raw(model_dir)["families"]["digits"]
    with pytest.raises(repository.Conflict):  # no candidate loaded
        repository.start_rollout(model_dir, "digits", {"id": "r", "candidate": fam["previous"], "started": 0})
    with pytest.raises(repository.Conflict):
        repository.set_candidate(model_dir, "digits", fam["active"])
    data = repository.raw(model_dir)
    data["families"]["digits"]["candidate"] = "2000-01-01-missing"
    (model_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="2000-01-01-missing"):
        repository.read(model_dir)


def test_dropping_the_candidate_stops_its_rollout(model_dir):
    previous = repository.raw(model_dir)["families"]["digits"]["previous"]
    repository.set_candidate(model_dir, "digits", previous)
    repository.start_rollout(model_dir, "digits", {"id": "r", "candidate": previous, "shadow": 0.5, "started": 0})
    repository.set_candidate(model_dir, "digits", None)
    fam = repository.read(model_dir).families["digits"]
    assert fam.candidate is None and fam.rollout.state == "stopped"


def test_a_refused_promotion_puts_the_old_versions_back_and_says_why(model_dir):
    fam = repository.raw(model_dir)["families"]["digits"]
    active, previous = fam["active"], fam["previous"]
    repository.set_candidate(model_dir, "digits", previous)
    repository.start_rollout(model_dir, "digits", {"id": "r9", "candidate": previous, "started": 0})
    repository.decide_rollout(model_dir, "digits", "r9", "promoted", "within every limit")
    repository.undo_promotion(model_dir, "digits", "r9", active, previous, "failed")
    after = repository.read(model_dir).families["digits"]
    assert (after.active, after.previous, after.candidate) == (active, previous, None)
    assert after.rollout.state == "rolled_back" and after.rollout.reason == "promotion failed: failed"


def test_live_evidence_counts_every_saved_tally_once_even_before_this_worker_follows_the_rollout(tmp_path):
    """A worker that has not synced the manifest's rollout yet (just started, or replaced after
    a crash) still answers with every saved tally, its own predecessor's included; once it
    follows the rollout, its own file is replaced by what it holds in memory, never added twice."""
    from types import SimpleNamespace

    status = tmp_path / ".status"
    status.mkdir()
    for worker, n in (("w0", 30), ("w1", 12)):
        tally = {"primary_requests": n, "shadow_compared": n, "agree_rows": n, "compared_rows": n}
        (status / f"rollout-R--{worker}.json").write_text(json.dumps({"tally": tally}))
    r = rollout.Rollouts(SimpleNamespace(directory=tmp_path, candidates={}), None)
    r.worker = "w0"
    assert r.evidence("digits") is None  # it knows of no rollout
    live = r.evidence("digits", "R", max_age_s=0)
    assert live["tally"]["shadow_compared"] == 42 and live["summary"]["evidence_requests"] == 42
    r.tallies["R"] = r._load("R")  # what following the rollout does: continue its own file
    r.tallies["R"]["shadow_compared"] += 5
    assert r.evidence("digits", "R", max_age_s=0)["tally"]["shadow_compared"] == 47
