"""What deepserve takes from BentoML's internals, in one place (pinned: bentoml==1.4.39).

Each function here reads something BentoML does not publish as API; tests/unit/test_compat.py
checks each one against the installed BentoML and names the pinned version when it breaks.
"""

from __future__ import annotations

import importlib
from typing import Any

PINNED_BENTOML = "1.4.39"

# exporter_type -> protocol -> the module BentoML imports in each worker
# (bentoml/_internal/configuration/containers.py, tracer_provider)
EXPORTERS = {
    "otlp": {
        "http": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    },
    "jaeger": {
        "thrift": "opentelemetry.exporter.jaeger.thrift",
        "grpc": "opentelemetry.exporter.jaeger.proto.grpc",
    },
    "zipkin": {None: "opentelemetry.exporter.zipkin.json"},
}


def service_overrides(name: str) -> dict[str, Any]:
    """The per-service configuration a user gave BentoML (BENTOML_CONFIG file or
    BENTOML_CONFIG_OPTIONS: `services.<name>.…`), as BentoML's container holds it."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    try:
        services = BentoMLContainer.config.services.get() or {}
    except KeyError:  # no per-service configuration given at all
        return {}
    return dict(services.get(name) or {})


def tracing_config(name: str, declared: dict[str, Any]) -> dict[str, Any]:
    """The tracing settings a worker of service `name` will use: the decorator's, overridden by
    the user's BentoML configuration."""
    return {**(declared or {}), **(service_overrides(name).get("tracing") or {})}


def tracing_problem(cfg: dict[str, Any]) -> str | None:
    """Why BentoML's workers would fail to set up this tracing configuration (None: they won't).
    Checked in the server process, so a bad configuration stops start-up with one line instead
    of a worker crash loop behind an open port."""
    kind = cfg.get("exporter_type")
    if not kind or kind in ("in_memory", "console"):
        return None
    if kind not in EXPORTERS:
        return f"tracing.exporter_type {kind!r} is not one of {', '.join(EXPORTERS)}"
    options = cfg.get(kind) or {}
    protocol = options.get("protocol") if kind != "zipkin" else None
    if protocol not in EXPORTERS[kind]:
        return f"tracing.{kind}.protocol {protocol!r} is not one of {', '.join(map(str, EXPORTERS[kind]))}"
    if kind == "otlp" and not options.get("endpoint"):
        return "tracing.otlp.endpoint is not set"
    module = EXPORTERS[kind][protocol]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        extra = "tracing-otlp" if kind == "otlp" else f"tracing-{kind}"
        return (
            f"tracing.exporter_type {kind} needs {module}, which is not installed ({exc}); "
            f"install BentoML's extra: pip install 'bentoml[{extra}]=={PINNED_BENTOML}'"
        )
    return None


def tracer_provider():
    """BentoML's tracer provider for this worker when its tracing configuration names an
    exporter (its sampler and exporter, as the user configured them), else None: with no
    exporter deepserve creates no span objects at all (BentoML's provider would still sample
    and record spans it never exports, so a low sample rate is not "off")."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    try:
        kind = BentoMLContainer.config.tracing.exporter_type.get()
    except (KeyError, AttributeError):
        return None
    if kind not in EXPORTERS and kind not in ("in_memory", "console"):
        return None
    return BentoMLContainer.tracer_provider.get()
