"""The serving core of one worker: the model directory, verified sessions, one adaptive
batcher per loaded model version, the image-decoding pool, and warm-up.

API handlers hand it validated jobs and get back one result per job. Nothing here knows
about HTTP. The unit that is loaded and switched is the family (all its models at one
version); each worker keeps the active and the previous version loaded (service.versions).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service import metrics, priority
from service.batching import Batcher, Overloaded
from service.errors import shown
from service.metadata import Manifest, MetadataError, read_manifest
from service.rollout import Rollouts
from service.runtime import Model, ModelLoadError, load_model, sha256_file
from service.settings import Settings, usable_cores
from service.tasks import TASKS, Job, Task, run_job

log = logging.getLogger("deepserve")


class NotServed(LookupError):
    """No such model, task or loaded version (the HTTP layer answers 404)."""


@dataclass
class Loaded:
    """One family at one version: its models, and a batcher for each."""

    family: str
    version: str
    models: dict[str, Model]
    batchers: dict[str, Batcher] = field(default_factory=dict)

    def shutdown(self) -> None:
        for b in self.batchers.values():
            b.shutdown()


def load_family(directory: Path, manifest: Manifest, family: str, version: str, device: str, threads: int) -> Loaded:
    """Open and check every model of a family at one version (no batchers yet)."""
    models = {}
    for name in manifest.families[family].models:
        entry = manifest.models[name]
        files = entry.versions.get(version)
        if files is None:
            raise ModelLoadError(f"model {name!r} has no version {version!r} in the manifest")
        model = load_model(directory, name, files, device, threads)
        if model.task != entry.task or model.family != family or model.version != version:
            raise ModelLoadError(
                f"model {name!r}: metadata says task {model.task!r}, family {model.family!r}, "
                f"version {model.version!r}; the manifest says {entry.task!r}, {family!r}, {version!r}"
            )
        try:
            TASKS[model.task].check(model)
        except ValueError as exc:
            raise ModelLoadError(f"model {name!r}: {exc}") from None
        check_smoke(directory / Path(files.metadata).parent, model)
        models[name] = model
    return Loaded(family, version, models)


def check_smoke(folder: Path, model: Model) -> None:
    """Run the model on its smoke set (golden inputs and outputs stored beside it) and refuse
    it if any output differs by more than the set's tolerance."""
    smoke = model.meta.smoke
    if smoke is None:
        return
    path = folder / smoke.file
    if not path.is_file() or sha256_file(path) != smoke.sha256:
        raise ModelLoadError(f"model {model.name!r}: smoke set {smoke.file} is missing or does not match its sha256")
    with np.load(path) as npz:
        feeds = {k[3:]: npz[k] for k in npz.files if k.startswith("in:")}
        want = {k[4:]: npz[k] for k in npz.files if k.startswith("out:")}
    try:
        got = dict(zip(model.output_names, model.run(**feeds)))
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"model {model.name!r}: smoke set does not run: {exc}") from None
    for name, expected in want.items():
        diff = float(np.max(np.abs(got[name].astype(np.float64) - expected))) if name in got else float("inf")
        if not diff <= smoke.atol:
            raise ModelLoadError(
                f"model {model.name!r}: smoke set output {name!r} differs by {diff:.3g} "
                f"(tolerance {smoke.atol:g}): this file does not compute what it was evaluated as"
            )


def load_all(directory: Path, device: str = "cpu", threads: int = 1) -> tuple[Manifest, dict[str, Loaded]]:
    """Every family's active version, verified (used at start-up, before workers start)."""
    try:
        manifest = read_manifest(directory)
    except MetadataError as exc:
        raise ModelLoadError(str(exc)) from None
    return manifest, {
        f: load_family(directory, manifest, f, e.active, device, threads) for f, e in manifest.families.items()
    }


def load_models(directory: Path, device: str = "cpu", threads: int = 1) -> dict[str, Model]:
    """Every model at its active version, by name (evaluation, benchmarks' peers)."""
    _, loaded = load_all(directory, device, threads)
    return {n: m for fam in loaded.values() for n, m in fam.models.items()}


class Core:
    def __init__(self, settings: Settings, directory: Path | None = None):
        self.settings = settings
        self.directory = directory or settings.exported_dir
        self.threads = settings.ort_threads()
        self.manifest, active = load_all(self.directory, settings.device, self.threads)
        self.ready = False
        # one thread per model: a model runs one batch at a time, different models in parallel
        self.executors: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self.active: dict[str, Loaded] = {}
        self.previous: dict[str, Loaded] = {}
        self.candidates: dict[str, Loaded] = {}  # a family's candidate: loaded, serving only its rollout's share
        self.rollouts = Rollouts(self, settings)  # shadow, canary and their tallies (service.rollout)
        # priority classes across this worker's batchers (service.priority)
        self.gate = priority.Gate(
            settings.priority_max_wait_ms / 1000, settings.priority_chunk_rows, settings.shadow_max_wait_ms / 1000
        )
        metrics.watch_gate(self.gate)
        for family, loaded in active.items():
            self.serve(loaded)
            self.active[family] = loaded
            prev = self.manifest.families[family].previous
            if prev is not None and prev != loaded.version:  # kept loaded: a rollback is a switch
                try:
                    self.previous[family] = self.serve(
                        load_family(self.directory, self.manifest, family, prev, settings.device, self.threads)
                    )
                except ModelLoadError as exc:
                    log.warning(
                        "previous version %s of %s is not loadable, rollback unavailable: %s", prev, family, exc
                    )
        # decoding large images: off the event loop, as many threads as this process may use
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(
            settings.decode_threads or usable_cores(), thread_name_prefix="decode"
        )
        self.decode_backlog = 0  # pixels submitted to the pool and not yet decoded
        for loaded in self.active.values():
            for model in loaded.models.values():
                metrics.model_served(model, 1)
                log.info(
                    "model %s %s (%s) on %s%s, %d ORT threads",
                    model.name,
                    model.version,
                    model.task,
                    model.provider,
                    f" ({model.provider_reason})" if model.provider_reason else "",
                    self.threads,
                )

    # ------------------------------------------------------------------ lookup

    @property
    def models(self) -> dict[str, Model]:
        """Every served model (active versions), by name."""
        return {n: m for loaded in self.active.values() for n, m in loaded.models.items()}

    def family_of(self, name: str) -> str:
        return self.manifest.models[name].family

    def default_model(self, task: str) -> str:
        name = self.manifest.default_for(task)
        if name is None or self.family_of(name) not in self.active:
            raise NotServed(f"no model for task {task!r} is served here")
        return name

    def names_for(self, task: str) -> list[str]:
        return [n for n, e in self.manifest.models.items() if e.task == task and e.family in self.active]

    def resolve(self, name: str, version: str | None = None) -> tuple[Model, Batcher]:
        """A model at its active version, or at a pinned version that is loaded."""
        entry = self.manifest.models.get(name)
        if entry is None or entry.family not in self.active:
            raise NotServed(f"no model {shown(name)}")
        loaded = self.active[entry.family]
        if version is not None and version != loaded.version:
            loaded = next((x for x in self._others(entry.family) if x.version == version), None)
            if loaded is None:
                raise NotServed(
                    f"model {name!r} has no loaded version {shown(version)}; loaded: {self.loaded_versions(name)}"
                )
        return loaded.models[name], loaded.batchers[name]

    def candidate(self, name: str) -> tuple[Model, Batcher] | None:
        """The model at its family's candidate version, if one is loaded."""
        loaded = self.candidates.get(self.family_of(name))
        return (loaded.models[name], loaded.batchers[name]) if loaded is not None else None

    def _others(self, family: str) -> list[Loaded]:
        return [x for x in (self.previous.get(family), self.candidates.get(family)) if x is not None]

    def loaded_versions(self, name: str) -> list[str]:
        family = self.family_of(name)
        return [x.version for x in (self.active.get(family), *self._others(family)) if x is not None]

    @property
    def provider(self) -> str:
        return next(iter(self.models.values())).provider

    # ------------------------------------------------------------------ batching

    def serve(self, loaded: Loaded) -> Loaded:
        """Give every model of a loaded family version its batcher."""
        s = self.settings
        for name, model in loaded.models.items():
            model.on_batch = metrics.observe_batch
            task = TASKS[model.task]
            executor = self.executors.setdefault(
                name, concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"ort-{name}")
            )
            loaded.batchers[name] = Batcher(
                name,
                functools.partial(_execute, task, model, s.max_batch_rows),
                executor=executor,
                enabled=s.batching,
                max_batch_size=s.max_batch_size,
                max_latency_ms=s.max_latency_ms,
                max_batch_rows=s.max_batch_rows,
                on_batch=metrics.observe_requests,
                gate=self.gate,
                on_shed=metrics.priority_shed,
            )
        return loaded

    def activate(self, loaded: Loaded) -> None:
        """Serve `loaded` from now on (between requests: one assignment on the event loop);
        the version it replaces stays loaded as the previous one, the one before is closed
        once its queues are empty."""
        family = loaded.family
        old, older = self.active.get(family), self.previous.get(family)
        if old is not None and old.version == loaded.version:
            return
        self.active[family] = loaded
        if self.candidates.get(family) is loaded:  # a promoted candidate
            del self.candidates[family]
        if old is not None:
            self.previous[family] = old
        if older is not None and older is not loaded and older is not old:
            asyncio.get_running_loop().create_task(_close_when_idle(older))
        for model in loaded.models.values():
            metrics.model_served(model, 1)
        if old is not None:
            for model in old.models.values():
                metrics.model_served(model, 0)

    def set_candidate(self, loaded: Loaded | None, family: str) -> None:
        """Hold `loaded` as the family's candidate (None: drop it; closed once idle, unless it
        is also the active or previous version)."""
        old = self.candidates.pop(family, None)
        if loaded is not None:
            self.candidates[family] = loaded
        keep = (self.active.get(family), self.previous.get(family), loaded)
        if old is not None and all(old is not x for x in keep):
            asyncio.get_running_loop().create_task(_close_when_idle(old))

    async def warmup(self, loaded: list[Loaded] | None = None) -> None:
        """Run every model through its batcher on dummy input (ORT's first runs are slow, and
        the batcher's cost model wants a few batches of different sizes); then mark ready."""
        for fam in loaded or list(self.active.values()):
            for name, model in fam.models.items():
                task, batcher = TASKS[model.task], fam.batchers[name]
                # at start-up nothing else runs; a version loaded later warms up behind client work
                cls = priority.INTERACTIVE if loaded is None else priority.BATCH
                for wave in (1, 4, 12):
                    await asyncio.gather(*(_warm(batcher, task.warmup(model), cls) for _ in range(wave)))
        if loaded is None:
            # everything allocated so far (BentoML, ORT sessions, metadata) lives for the whole
            # process: keep it out of the collector's generations so its pauses stay short
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 50, 100)  # fewer, still small, young collections per request burst
            self.ready = True
            log.info("deepserve ready: %d models warmed up", len(self.models))

    def shutdown(self) -> None:
        for loaded in [*self.active.values(), *self.previous.values(), *self.candidates.values()]:
            loaded.shutdown()
        for ex in self.executors.values():
            ex.shutdown(wait=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


async def _warm(batcher: Batcher, job: Job, cls: int, patience_s: float = 60.0) -> None:
    """One warm-up job through its batcher. Admission control is for clients' requests: a
    cost model that has seen no batch yet (or a slow first ORT run) predicts waits past
    max_latency_ms, and a shed warm-up once left a candidate "loading" for good. Queued at the
    batch class it may still be shed for client work: it then waits and goes again."""
    deadline = asyncio.get_running_loop().time() + patience_s
    while True:
        try:
            await batcher.submit(job, job.rows, cls=cls, admit=False)
            return
        except Overloaded:
            if asyncio.get_running_loop().time() > deadline:
                raise ModelLoadError(
                    f"model {batcher.name!r}: warm-up shed for {patience_s:g} s: client work kept the batcher full"
                ) from None
            await asyncio.sleep(0.05)


async def _close_when_idle(loaded: Loaded, timeout_s: float = 60.0) -> None:
    """Shut a version's batchers once nothing is queued or running on them."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if all(b.idle() for b in loaded.batchers.values()):
            break
        await asyncio.sleep(0.1)
    loaded.shutdown()
    log.info("closed version %s of %s", loaded.version, loaded.family)


def _execute(task: Task, model: Model, max_rows: int, jobs: list[Job]) -> list:
    """The batch function of one model (runs in its batch thread): forward, then finish."""
    outputs = task.forward(model, jobs, max_rows)
    return [job.finish(out) if job.finish else out for job, out in zip(jobs, outputs)]


__all__ = ["Core", "Loaded", "NotServed", "load_all", "load_family", "load_models", "run_job"]
