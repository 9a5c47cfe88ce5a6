"""A candidate version on live traffic: shadow, canary, and an automatic decision.

A family's `candidate` (manifest) is loaded by every worker next to the active and previous
versions and serves nothing by itself. Its `rollout` (manifest, written only through
service.repository) says what it gets:

    shadow  a share of the family's live requests is mirrored to the candidate after the
            client's answer is on its way: built from the candidate's own metadata (the same
            body decoded again; a generator request keeps its seed), run at the `shadow`
            priority class (spare capacity only, dropped first, never queued at saturation,
            and within the worker's shadow CPU budget, DEEPSERVE_SHADOW_CPU_SHARE of a core:
            a 100% shadow is sampled down as load rises), and compared with the active
            version's answer. A shadow failure reaches no client.
    canary  a share of the family's clients (sticky: a hash of the rollout id and the client
            key, so a client keeps its version for the whole rollout) is answered by the
            candidate; answers carry its `model_version`. Pinned versions get what they pin.

Each worker tallies what it saw (requests, errors, compute per row for each version; compared
rows, agreement, confidence and OOD-flag deltas, PSNR) and saves the tally every
`DEEPSERVE_ROLLOUT_CHECK_S` to `<model dir>/.status/rollout-<id>--<worker>.json`; a restarted
worker continues its file, and a worker that is gone still counts, so the evidence survives
restarts. With a policy, every worker sums all files and, once there is enough evidence,
decides: promote (the candidate becomes active through the verified switch every worker
makes) or roll back (the candidate is dropped). The decision is one manifest update under
the repository's lock that only the rollout's first decider can make; it is logged with its
evidence, counted (deepserve_rollout_decisions_total) and alertable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from service import metrics, priority, repository
from service.batching import Overloaded
from service.errors import ApiError, ClientGone
from service.metadata import Manifest, Rollout
from service.runtime import Model
from service.tasks import TASKS

log = logging.getLogger("deepserve")
agg = metrics.aggregate  # per-request metrics are summed in memory and written about once a second
FIELDS = (
    "primary_requests",
    "primary_errors",
    "primary_compute_s",
    "primary_rows",
    "candidate_requests",  # canary answers and shadow runs
    "candidate_errors",
    "candidate_compute_s",
    "candidate_rows",
    "canary_requests",
    "shadow_sent",
    "shadow_compared",
    "shadow_dropped",
    "shadow_failed",
    "compared_rows",
    "agree_rows",
    "confidence_delta_sum",
    "ood_flips",
    "psnr_sum",
    "psnr_rows",
)
CLASSIFIERS = ("image-classification", "text-classification")
PSNR_CAP = 100.0  # identical outputs


def client_key(req) -> str:
    """Who a canary sticks to: `X-Client-Id`, else the client address (behind a proxy that is
    the proxy's: clients should send X-Client-Id; deepserve's one API key names no client)."""
    key = req.header("x-client-id")
    if key:
        return key
    client = req.scope.get("client")
    return client[0] if client else ""


def canary_point(rollout_id: str, key: str) -> float:
    """A client's fixed point in [0, 1) for one rollout: it gets the canary when the point is
    below the rollout's canary share (raising the share keeps every client already on it)."""
    digest = hashlib.sha256(f"{rollout_id}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR (dB) per row between two image batches in [0, 1], capped at PSNR_CAP."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(1.0 / np.maximum(mse, 1e-30)), PSNR_CAP)


def _labels(result: Any) -> tuple[list[int], list[float] | None, list[bool] | None]:
    """A classifier's result -> (top-1 index, top-1 probability, in-distribution) per row;
    the routes' answers or /v2's tensors (first 2-D output's argmax)."""
    if isinstance(result, list):
        return (
            [r["index"] for r in result],
            [r["confidence"] for r in result],
            [r["in_distribution"] for r in result] if result and "in_distribution" in result[0] else None,
        )
    arr = next(v for v in result.values() if getattr(v, "ndim", 0) == 2)
    return arr.argmax(1).tolist(), None, None


def _images(result: Any) -> np.ndarray:
    if isinstance(result, dict):
        result = next(v for v in result.values() if getattr(v, "ndim", 0) >= 3)
    arr = np.asarray(result, np.float32)
    return arr.reshape(len(arr), -1)


def compare(task: str, primary: Any, shadow: Any, min_psnr_db: float) -> dict[str, float]:
    """One request answered by both versions -> the tally's comparison fields."""
    if task in CLASSIFIERS:
        (pi, pc, po), (si, sc, so) = _labels(primary), _labels(shadow)
        out = {"compared_rows": len(pi), "agree_rows": sum(a == b for a, b in zip(pi, si))}
        if pc is not None and sc is not None:
            out["confidence_delta_sum"] = sum(abs(a - b) for a, b in zip(pc, sc))
        if po is not None and so is not None:
            out["ood_flips"] = sum(a != b for a, b in zip(po, so))
        return out
    p, s = _images(primary), _images(shadow)
    if p.shape != s.shape:
        return {"compared_rows": len(p), "psnr_rows": 0}
    db = psnr(p, s)
    return {
        "compared_rows": len(db),
        "agree_rows": int((db >= min_psnr_db).sum()),
        "psnr_sum": float(db.sum()),
        "psnr_rows": len(db),
    }


def summary(t: dict[str, float]) -> dict[str, float | None]:
    """Rates from a tally (None where there is nothing to divide)."""

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    prim_cost = ratio(t["primary_compute_s"], t["primary_rows"])
    cand_cost = ratio(t["candidate_compute_s"], t["candidate_rows"])
    return {
        "agreement": ratio(t["agree_rows"], t["compared_rows"]),
        "mean_confidence_delta": ratio(t["confidence_delta_sum"], t["compared_rows"]),
        "ood_flip_rate": ratio(t["ood_flips"], t["compared_rows"]),
        "mean_psnr_db": ratio(t["psnr_sum"], t["psnr_rows"]),
        "primary_error_rate": ratio(t["primary_errors"], t["primary_requests"]),
        "candidate_error_rate": ratio(t["candidate_errors"], t["candidate_requests"]),
        "latency_ratio": ratio(cand_cost, prim_cost) if cand_cost is not None and prim_cost else None,
        "evidence_requests": t["shadow_compared"] + t["canary_requests"],
    }


def judge(rollout: Rollout, t: dict[str, float]) -> tuple[str, str] | None:
    """The policy's decision on a tally: ("promoted" | "rolled_back", why), or None while the
    evidence is short of min_requests."""
    p = rollout.policy
    if p is None:
        return None
    s = summary(t)
    if s["evidence_requests"] < p.min_requests:
        return None
    failed = []
    if s["agreement"] is not None and s["agreement"] < p.min_agreement:
        failed.append(f"agreement {s['agreement']:.4f} < {p.min_agreement}")
    increase = (s["candidate_error_rate"] or 0.0) - (s["primary_error_rate"] or 0.0)
    if increase > p.max_error_rate_increase:
        failed.append(f"error rate +{increase:.4f} > {p.max_error_rate_increase}")
    if s["latency_ratio"] is not None and s["latency_ratio"] > p.max_latency_ratio:
        failed.append(f"latency ratio {s['latency_ratio']:.2f} > {p.max_latency_ratio}")
    if failed:
        return "rolled_back", "; ".join(failed)
    return "promoted", f"{int(s['evidence_requests'])} requests within every limit"


class Rollouts:
    """This worker's side of every running rollout: routing, mirroring, its tally."""

    def __init__(self, core, settings):
        self.core, self.settings = core, settings
        self.running: dict[str, Rollout] = {}  # family -> its running rollout
        self.tallies: dict[str, dict[str, float]] = {}  # rollout id -> this worker's tally
        self.dirty: set[str] = set()
        self.inflight = 0
        self.budget = priority.ShadowBudget(getattr(settings, "shadow_cpu_share", 0.05))
        self._tasks: set[asyncio.Task] = set()
        self._evidence: dict[
            str, tuple[float, str, dict]
        ] = {}  # family -> (when, rollout id, evidence): /models reads it often
        self.worker = "0"

    # ---- following the manifest

    def sync(self, manifest: Manifest) -> None:
        running = {}
        for family, entry in manifest.families.items():
            r = entry.rollout
            if r is not None and r.state == "running" and family in self.core.candidates:
                running[family] = r
                if r.id not in self.tallies:  # new here, or this worker restarted: continue its file
                    self.tallies[r.id] = self._load(r.id)
        for family in set(self.running) - set(running):  # ended: its agreement no longer holds
            metrics.get().rollout_agreement.labels(family).set(-1)
        self.running = running
        self._evidence.clear()

    def folder(self) -> Path:
        return self.core.directory / ".status"

    def _path(self, rollout_id: str, worker: str | None = None) -> Path:
        return self.folder() / f"rollout-{rollout_id}--{worker or self.worker}.json"

    def _load(self, rollout_id: str) -> dict[str, float]:
        tally = dict.fromkeys(FIELDS, 0.0)
        try:
            saved = json.loads(self._path(rollout_id).read_text())
            tally.update({k: float(v) for k, v in saved.get("tally", {}).items() if k in tally})
        except (OSError, ValueError):
            pass
        return tally

    def save(self) -> None:
        for rollout_id in list(self.dirty):
            self.dirty.discard(rollout_id)
            payload = {"rollout": rollout_id, "worker": self.worker, "saved": time.time()}
            payload["tally"] = self.tallies[rollout_id]
            try:
                self.folder().mkdir(exist_ok=True)
                repository.write_json_atomic(self._path(rollout_id), payload)
            except OSError as exc:  # a read-only model directory: the tally stays in memory
                log.debug("cannot save the rollout tally: %s", exc)

    def totals(self, rollout_id: str) -> dict[str, float]:
        """Every worker's saved tally for a rollout, summed (this worker's as it is now)."""
        total = dict.fromkeys(FIELDS, 0.0)
        mine = self._path(rollout_id).name if rollout_id in self.tallies else None  # else its file counts
        for path in self.folder().glob(f"rollout-{rollout_id}--*.json"):
            if path.name == mine:
                continue
            try:
                saved = json.loads(path.read_text()).get("tally", {})
            except (OSError, ValueError):
                continue
            for k in FIELDS:
                total[k] += float(saved.get(k, 0.0))
        for k, v in self.tallies.get(rollout_id, {}).items():
            total[k] += v
        return total

    def _add(self, family: str, **fields: float) -> None:
        r = self.running.get(family)
        if r is None:
            return
        tally = self.tallies[r.id]
        for k, v in fields.items():
            tally[k] += v
        self.dirty.add(r.id)

    # ---- the request path (service.dataplane)

    def canary(self, family: str, req) -> bool:
        r = self.running.get(family)
        return r is not None and r.canary > 0 and canary_point(r.id, client_key(req)) < r.canary

    def observe(self, family: str, role: str, job, ok: bool) -> None:
        """A request of a family with a running rollout, answered by `role` (primary/canary)."""
        if family not in self.running:
            return
        compute = job.infer_s * job.rows / max(getattr(job, "batch_rows", job.rows), 1) if ok else 0.0
        side = "primary" if role == "primary" else "candidate"
        fields = {f"{side}_requests": 1, f"{side}_errors": 0 if ok else 1}
        if ok:
            fields.update({f"{side}_compute_s": compute, f"{side}_rows": job.rows})
            agg.observe("rollout_latency", (family, role), compute)
        if role == "canary":
            fields["canary_requests"] = 1
        self._add(family, **fields)
        agg.inc("rollout_requests", (family, role, "ok" if ok else "error"))

    def mirror(self, model: Model, decode, result: Any, req, tensors: bool = False) -> None:
        """Maybe mirror a request the active version answered to the candidate (background,
        decoded again from a detached copy of the request: the client's is left alone)."""
        r = self.running.get(model.family)
        if r is None or r.shadow <= 0 or (r.shadow < 1 and random.random() >= r.shadow):
            return
        target = self.core.candidate(model.name)
        if target is None or not self._comparable(model, target[0], result, tensors):
            return
        self._add(model.family, shadow_sent=1)
        cand, batcher = target
        # spare capacity only: a shadow must never take a slot in the decode pool a client needs
        if self.inflight >= self.settings.shadow_max_inflight or not self.core.gate.spare() or self.core.decode_backlog:
            return self._dropped(model.family, shed=True)
        charge = self.budget.admit(cand.name)  # and within the worker's shadow CPU budget
        if charge is None:
            return self._dropped(model.family, shed=True)
        self.inflight += 1
        task = asyncio.get_running_loop().create_task(
            self._shadow(r, model, cand, batcher, decode, result, req.detached(), charge)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _comparable(model: Model, cand: Model, result: Any, tensors: bool) -> bool:
        """Whether the two versions' answers to this request can be compared at all: tensors
        shaped for one signature go only to a candidate with the same one; a decoder reads the
        codes its own encoder wrote (only between equal codecs); codes compare through their
        reconstructions, which needs the route's answer."""
        if tensors and cand.meta.inputs != model.meta.inputs:
            return False
        if model.task == "image-compression-decoder":
            return model.meta.codec == cand.meta.codec
        if model.task == "image-compression-encoder":
            return isinstance(result, list) and bool(model.meta.pair)
        return True

    def _dropped(self, family: str, shed: bool = False) -> None:
        """A mirror dropped (`shed`: at the door here; otherwise the batcher counted its shed)."""
        self._add(family, shadow_dropped=1)
        if shed:
            agg.inc("class_shed", ("shadow",))
        agg.inc("rollout_requests", (family, "shadow", "dropped"))

    async def _shadow(
        self, r: Rollout, model: Model, cand: Model, batcher, decode, primary: Any, ctx, charge: float
    ) -> None:
        family, cost = model.family, [0.0]  # CPU seconds: decoding (wall, an upper bound) + model runs
        try:
            started = time.perf_counter()
            job = await decode(cand, ctx)  # the candidate's own metadata builds its request
            cost[0] += time.perf_counter() - started
            result = await batcher.submit(job, job.rows, None, 0.0, priority.SHADOW)
            cost[0] += job.infer_s * job.rows / max(getattr(job, "batch_rows", job.rows), 1)
            if model.task == "image-compression-encoder":  # codes differ by version: compare what they decode to
                primary, result = await self._reconstructions(model, cand, primary, result, cost)
        except (Overloaded, ClientGone):
            return self._dropped(family)
        except ApiError as exc:
            if exc.status == 503:  # the decode pool is busy: no spare capacity after all
                return self._dropped(family, shed=True)
            self._failed(family, model, cand, exc)
            return
        except Exception as exc:  # the candidate failed where the active version answered
            self._failed(family, model, cand, exc)
            return
        finally:
            self.inflight -= 1
            self.budget.settle(cand.name, charge, cost[0])
        current = self.running.get(family)
        if current is None or current.id != r.id:  # the rollout ended meanwhile
            return
        policy = r.policy
        fields = compare(model.task, primary, result, policy.min_psnr_db if policy else 20.0)
        compute = job.infer_s * job.rows / max(getattr(job, "batch_rows", job.rows), 1)
        self._add(
            family,
            shadow_compared=1,
            candidate_requests=1,
            candidate_compute_s=compute,
            candidate_rows=job.rows,
            **fields,
        )
        agg.inc("rollout_requests", (family, "shadow", "ok"))
        agg.observe("rollout_latency", (family, "shadow"), compute)
        rows, agree = fields.get("compared_rows", 0), fields.get("agree_rows", 0)
        if agree:
            agg.inc("shadow_rows", (family, "true"), agree)
        if rows - agree:
            agg.inc("shadow_rows", (family, "false"), rows - agree)
        if "confidence_delta_sum" in fields and rows:
            agg.observe("shadow_confidence_delta", (family,), fields["confidence_delta_sum"] / rows)
        if fields.get("ood_flips"):
            agg.inc("shadow_ood_flips", (family,), fields["ood_flips"])
        if fields.get("psnr_rows"):
            agg.observe("shadow_psnr", (family,), fields["psnr_sum"] / fields["psnr_rows"])

    def _failed(self, family: str, model: Model, cand: Model, exc: Exception) -> None:
        self._add(family, shadow_failed=1, candidate_requests=1, candidate_errors=1)
        agg.inc("rollout_requests", (family, "shadow", "error"))
        log.warning("shadow request to %s %s failed: %s", model.name, cand.version, str(exc)[:200])

    async def _reconstructions(self, model: Model, cand: Model, codes: Any, cand_codes: Any, cost: list[float]):
        """Both versions' codes through their own decoders, at the shadow class (their runs
        added to `cost`)."""
        decoder = model.meta.pair
        if not isinstance(codes, list) or not decoder:
            raise ValueError("compression shadows compare route answers only")
        out = []
        for version_model, version_codes in ((model, codes), (cand, cand_codes)):
            dec, batcher = self.core.resolve(decoder, version_model.version)
            job = TASKS[dec.task].job(dec, version_codes)
            out.append(await batcher.submit(job, job.rows, None, 0.0, priority.SHADOW))
            cost[0] += job.infer_s * job.rows / max(getattr(job, "batch_rows", job.rows), 1)
        return out[0], out[1]

    # ---- the decision (every worker checks; the first to write it decides)

    def evidence(self, family: str, rollout_id: str | None = None, max_age_s: float = 1.0) -> dict | None:
        """Every worker's tally for the family's running rollout (or `rollout_id`, the one the
        manifest names, which this worker may not follow yet: then the saved tallies alone),
        summed and cached `max_age_s`."""
        r = self.running.get(family)
        rollout_id = rollout_id or (r.id if r is not None else None)
        if rollout_id is None:
            return None
        cached = self._evidence.get(family)
        if cached is not None and cached[1] == rollout_id and time.monotonic() - cached[0] < max_age_s:
            return cached[2]
        totals = self.totals(rollout_id)
        out = {"tally": totals, "summary": summary(totals)}
        self._evidence[family] = (time.monotonic(), rollout_id, out)
        return out

    async def check(self, follower) -> None:
        """Save this worker's tally; for each running rollout with a policy, decide if the
        evidence of every worker allows it."""
        self.save()
        m = metrics.get()
        for family, r in list(self.running.items()):
            totals = await asyncio.to_thread(self.totals, r.id)
            agreement = summary(totals)["agreement"]
            m.rollout_agreement.labels(family).set(-1 if agreement is None else agreement)
            verdict = judge(r, totals)
            if verdict is None:
                continue
            decision, reason = verdict
            evidence = {"tally": totals, "summary": summary(totals), "policy": r.policy.model_dump()}
            try:
                await asyncio.to_thread(
                    repository.decide_rollout, self.core.directory, family, r.id, decision, reason, evidence
                )
            except repository.Conflict:
                continue  # another worker decided first
            m.rollout_decisions.labels(family, decision, "policy").inc()
            before = self.core.manifest.families[family]
            log.warning(
                "rollout %s of %s: %s (%s); evidence %s",
                r.id,
                family,
                decision,
                reason,
                json.dumps(evidence["summary"]),
            )
            await follower.sync()
            if decision == "promoted":  # watched in a task of its own: the follower keeps following
                task = asyncio.get_running_loop().create_task(
                    self._confirm(follower, family, r, (before.active, before.previous))
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _confirm(self, follower, family: str, r: Rollout, fallback: tuple[str, str | None]) -> None:
        if await follower.confirm(family, r.candidate, fallback, r.id) != "ok":
            metrics.get().rollout_decisions.labels(family, "promotion_failed", "policy").inc()


def new_rollout_id(candidate: str) -> str:
    """A fresh id per rollout (the canary's hash and the tally files are keyed by it)."""
    return f"{candidate}.{int(time.time() * 1000) % 10**10}"
