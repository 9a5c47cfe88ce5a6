"""LitServe with its batching on (max 32, 5 ms), one LitAPI per endpoint, over the same models
and preprocessing as deepserve. The LitAPI classes live at module level: LitServe starts its
inference workers with spawn, which pickles them."""

from __future__ import annotations

import math

import litserve as ls
import numpy as np

from bench.common import decode, models, top
from service import preprocessing as pp
from service import tasks


class Classify(ls.LitAPI):
    def setup(self, device):
        self.models = models()

    def decode_request(self, request):
        if hasattr(request, "getlist"):  # multipart form
            m = self.models[request.get("model", "digits")]
            return ("image", m.name, decode(request["image"].file.read(), m.meta.preprocessing.invert))
        m = self.models["sentiment"]
        return ("text", m.name, tasks.encode_texts(m, [request["text"]])[0] or [pp.UNK])

    def predict(self, xs):
        out = []
        for kind in ("image", "text"):
            for name in {x[1] for x in xs if x[0] == kind}:
                idx = [i for i, x in enumerate(xs) if x[0] == kind and x[1] == name]
                m = self.models[name]
                if kind == "image":
                    probs = tasks.classify_images(m, np.concatenate([xs[i][2] for i in idx]))
                else:
                    probs = tasks.classify_token_ids(m, [xs[i][2] for i in idx])
                out += [(i, top(m, p)) for i, p in zip(idx, probs)]
        return [r for _, r in sorted(out, key=lambda t: t[0])]

    def batch(self, xs):
        return xs

    def unbatch(self, ys):
        return ys

    def encode_response(self, y):
        return y


class Generate(ls.LitAPI):
    def setup(self, device):
        self.models = models()

    def decode_request(self, request):
        return request.get("n", 16), request.get("digit"), request.get("seed", 0)

    def batch(self, xs):
        return xs

    def predict(self, xs):
        g = self.models["generator"]
        zs, ds = zip(*(pp.sample_latents(n, g.meta.preprocessing.z_dim, s, d) for n, d, s in xs))
        images = tasks.generate(g, np.concatenate(zs), np.concatenate(ds))
        counts = np.cumsum([n for n, _, _ in xs])[:-1]
        return [pp.png_bytes(pp.grid(part, cols=math.ceil(math.sqrt(len(part))))) for part in np.split(images, counts)]

    def unbatch(self, ys):
        return ys

    def encode_response(self, png):
        from fastapi import Response

        return Response(png, media_type="image/png")


class Denoise(Generate):
    def decode_request(self, request):
        return decode(request["image"].file.read(), "none")

    def predict(self, xs):
        out = tasks.denoise(self.models["denoiser"], np.concatenate(xs))
        return [pp.png_bytes(o) for o in out]


def serve(port: int) -> None:
    kw = {"max_batch_size": 32, "batch_timeout": 0.005}
    server = ls.LitServer(
        [
            Classify(api_path="/classify", **kw),
            Generate(api_path="/generate", **kw),
            Denoise(api_path="/denoise", **kw),
        ],
        accelerator="cpu",
        devices=1,
        workers_per_device=1,
    )
    server.run(port=port, host="127.0.0.1", generate_client_file=False)
