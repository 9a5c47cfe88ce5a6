"""The serving core of one worker: verified models, one adaptive batcher per model, warm-up.

API handlers hand it validated arrays (one block of rows per request) and get back one
block of results per request. Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging

import numpy as np

from service import metrics, tasks
from service import preprocessing as pp
from service.batching import Batcher, run_rows
from service.runtime import Model, load_registry
from service.settings import Settings

log = logging.getLogger("deepserve")


class Core:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: dict[str, Model] = load_registry(settings.exported_dir, settings.device, settings.ort_threads())
        self.ready = False
        # one thread per model: a model runs one batch at a time, different models in parallel
        self.executor = concurrent.futures.ThreadPoolExecutor(len(self.models), thread_name_prefix="ort")
        self.batchers = {name: self._batcher(name, fn) for name, fn in self._batch_functions().items()}
        for model in self.models.values():
            model.on_batch = metrics.observe_batch
            metrics.get().model_info.labels(model.name, model.version, model.provider).set(1)
            log.info("model %s %s on %s (%d ORT threads)", model.name, model.version,
                     model.provider, settings.ort_threads())  # fmt: skip

    @property
    def provider(self) -> str:
        return next(iter(self.models.values())).provider

    def _batcher(self, name: str, fn) -> Batcher:
        s = self.settings
        return Batcher(name, fn, enabled=s.batching, max_batch_size=s.max_batch_size,
                       max_latency_ms=s.max_latency_ms, executor=self.executor,
                       on_requests=lambda n, k: metrics.get().batch_requests.labels(n).observe(k))  # fmt: skip

    def _batch_functions(self) -> dict:
        """model name -> function(list of per-request inputs) -> list of per-request outputs."""
        m = self.models
        rows = lambda fn: functools.partial(run_rows, fn, max_rows=self.settings.max_batch_rows)
        fns = {
            "digits": rows(functools.partial(tasks.classify_images, m.get("digits"))),
            "fashion": rows(functools.partial(tasks.classify_images, m.get("fashion"))),
            "generator": rows(functools.partial(tasks.generate, m.get("generator"))),
            "encoder": rows(functools.partial(_compress_rows, m.get("encoder"))),
            "decoder": rows(functools.partial(_decompress_rows, m.get("decoder"))),
            "denoiser": rows(functools.partial(tasks.denoise, m.get("denoiser"))),
            "sentiment": functools.partial(_texts_batch, m.get("sentiment")),
        }
        return {name: fn for name, fn in fns.items() if name in m}

    async def run(self, model: str, item):
        """Submit one request's validated input to the model's batcher."""
        return await self.batchers[model].submit(item)

    async def warmup(self) -> None:
        """Run every model through its batcher on dummy input (ORT's first runs are slow, and
        BentoML's batcher calibrates its cost model on its first calls); then mark ready."""
        blank = np.zeros((1, pp.IMAGE_SIZE, pp.IMAGE_SIZE), dtype=np.float32)
        samples = {"digits": (blank,), "fashion": (blank,), "denoiser": (blank,), "encoder": (blank,),
                   "sentiment": [[pp.UNK]]}  # fmt: skip
        if "generator" in self.models:
            z, d = pp.sample_latents(1, self.models["generator"].meta["preprocessing"]["z_dim"], 0, 0)
            samples["generator"] = (z, d)
        if "decoder" in self.models:
            samples["decoder"] = (np.zeros((1, self.models["decoder"].meta["codec"]["bytes"]), np.uint8),)
        for name in self.batchers:
            for _ in range(3):  # waves: the calibration wants calls of 1, 2 and 3 requests
                await asyncio.gather(*(self.run(name, samples[name]) for _ in range(12)))
        # everything allocated so far (BentoML, ORT sessions, metadata) lives for the whole
        # process: keep it out of the collector's generations so its pauses stay short
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)  # fewer, still small, young collections per request burst
        self.ready = True
        log.info("deepserve ready: %d models warmed up", len(self.models))

    def shutdown(self) -> None:
        for b in self.batchers.values():
            b.shutdown()
        self.executor.shutdown(wait=True)


def _compress_rows(encoder: Model, images: np.ndarray) -> np.ndarray:
    codes = tasks.compress(encoder, images)
    return np.frombuffer(b"".join(codes), dtype=np.uint8).reshape(len(codes), -1)


def _decompress_rows(decoder: Model, codes: np.ndarray) -> np.ndarray:
    return tasks.decompress(decoder, [row.tobytes() for row in codes])


def _texts_batch(model: Model, items: list[list[list[int]]]) -> list[np.ndarray]:
    counts = [len(it) for it in items]
    probs = tasks.classify_token_ids(model, [seq for it in items for seq in it])
    return np.split(probs, np.cumsum(counts)[:-1])
