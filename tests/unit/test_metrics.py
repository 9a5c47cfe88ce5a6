"""Aggregated observations reach Prometheus exactly as direct ones would."""

import prometheus_client as prom

from service import metrics


def samples(registry, name: str, **labels) -> dict:
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name.startswith(name) and all(s.labels.get(k) == v for k, v in labels.items()):
                out[(s.name, s.labels.get("le"))] = s.value
    return out


def test_aggregated_histograms_and_counters_equal_direct_observations():
    values = [0.0001, 0.0003, 0.0021, 0.0021, 0.05, 0.3, 7.0, 100.0]
    m = metrics.get()
    direct = prom.Histogram("direct_stage_seconds", "x", ["endpoint", "stage"], buckets=metrics.SECONDS_BUCKETS)
    for i, v in enumerate(values):
        direct.labels("/unit-test", "decode").observe(v)
        if i % 2:  # a request's Server-Timing stages, bucketed only at the flush
            metrics.aggregate.stages("/unit-test", {"decode": v})
        else:
            metrics.aggregate.observe("stage", ("/unit-test", "decode"), v)
    metrics.aggregate.inc("requests", ("/unit-test", "200"), 3)
    before = samples(prom.REGISTRY, "deepserve_http_requests_total", endpoint="/unit-test", code="200")
    metrics.aggregate.flush()
    want = {
        (k[0].replace("direct_stage", "deepserve_stage"), k[1]): v
        for k, v in samples(prom.REGISTRY, "direct_stage_seconds").items()
        if not k[0].endswith("_created")
    }
    got = {
        k: v
        for k, v in samples(prom.REGISTRY, "deepserve_stage_seconds", endpoint="/unit-test", stage="decode").items()
        if not k[0].endswith("_created")
    }
    assert got == want
    after = samples(prom.REGISTRY, "deepserve_http_requests_total", endpoint="/unit-test", code="200")
    assert after[("deepserve_http_requests_total", None)] - before.get(("deepserve_http_requests_total", None), 0) == 3
    assert m is metrics.get()


def test_observe_many_equals_one_observe_per_value():
    values = [0.2, 0.5, 0.55, 0.999, 1.0, 0.95]
    one, many = metrics.Aggregator(), metrics.Aggregator()
    for v in values:
        one.observe("confidence", ("unit-model",), v)
    many.observe_many("confidence", ("unit-model",), values[:2])
    many.observe_many("confidence", ("unit-model",), values[2:])
    assert many.histograms == one.histograms
