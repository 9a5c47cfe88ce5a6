"""The BentoML internals deepserve reads (service/compat.py), checked against the installed
BentoML: when one of these fails after an upgrade, the message names the pinned version."""

from __future__ import annotations

from pathlib import Path

import bentoml

from service import compat

PIN = f"(written against bentoml=={compat.PINNED_BENTOML}; installed {bentoml.__version__})"


def test_the_pin_is_the_installed_bentoml():
    assert bentoml.__version__ == compat.PINNED_BENTOML, PIN


def test_the_exporter_table_is_what_bentoml_imports_in_its_workers():
    from bentoml._internal.configuration import containers

    source = Path(containers.__file__).read_text()
    for kind, protocols in compat.EXPORTERS.items():
        assert f'tracer_type == "{kind}"' in source, f"BentoML no longer has exporter {kind} {PIN}"
        for module in protocols.values():
            package, _, name = module.rpartition(".")
            assert f"from {package} import {name}" in source or f"from {module} import" in source, (
                f"BentoML no longer imports {module} for {kind} {PIN}"
            )


def test_service_overrides_reads_bentoml_s_per_service_configuration(monkeypatch):
    from bentoml._internal.configuration.containers import BentoMLContainer

    assert hasattr(BentoMLContainer.config, "services"), f"BentoMLContainer.config.services is gone {PIN}"
    assert isinstance(compat.service_overrides("deepserve"), dict)


def test_tracing_problems_are_named():
    assert compat.tracing_problem({}) is None
    assert compat.tracing_problem({"exporter_type": "in_memory"}) is None
    assert "not one of" in compat.tracing_problem({"exporter_type": "carrier-pigeon"})
    assert "protocol" in compat.tracing_problem({"exporter_type": "otlp", "otlp": {}})
    assert "endpoint" in compat.tracing_problem({"exporter_type": "otlp", "otlp": {"protocol": "http"}})
