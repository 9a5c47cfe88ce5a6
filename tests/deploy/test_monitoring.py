"""The monitoring stack against the real thing: promtool checks and unit tests, then a real
Prometheus scraping a real deepserve, with every rule loaded and every dashboard query
returning data (a rollout runs meanwhile: digits and generator twins of the active versions
on shadow and canary, so the rollout panels have data too)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from tests.conftest import EXPORTED, FIXTURES, REPO, require_tools
from tests.service.conftest import Server, free_port
from tests.service.test_versions import ADMIN, add_version

PROM = REPO / "deploy" / "prometheus"
ROLLOUTS, TWIN = ("digits", "generator"), "2099-04-01-twin"
DASHBOARD = REPO / "deploy" / "grafana" / "deepserve.json"
pytestmark = [pytest.mark.timing, require_tools("prometheus", "promtool")]  # timing: make test-noisy


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=PROM, capture_output=True, text=True, timeout=120)


def test_promtool_check_config_and_rules():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "recording.yml", "alerts.yml")):
        out = promtool(*args)
        assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rule_unit_tests_pass():
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_every_alert_has_a_unit_test_and_a_runbook():
    alerts = [r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    tests = (PROM / "alerts_test.yml").read_text()
    runbook = (REPO / "docs" / "operations.md").read_text().lower()
    for name in alerts:
        assert tests.count(f'alertname="{name}"') >= 1, f"{name} has no promtool test"
        assert f"runbook-{name.lower()}" in runbook, f"{name} has no runbook entry"


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"].replace("$__rate_interval", "1m") for p in panels for t in p["targets"]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """deepserve + Prometheus scraping it every second with deploy/'s rules."""
    tmp = tmp_path_factory.mktemp("prometheus")
    models = tmp / "exported"
    shutil.copytree(EXPORTED, models, ignore=shutil.ignore_patterns(".status", ".manifest.lock"))
    for family in ROLLOUTS:
        add_version(models, family, TWIN)
    server = Server(env={"DEEPSERVE_EXPORTED_DIR": str(models), "DEEPSERVE_ADMIN_KEY": "admin-secret"})
    for family in ROLLOUTS:  # a candidate on shadow and canary (no policy: it runs for the whole test)
        base = f"{server.url}/admin/models/{family}"
        r = httpx.post(f"{base}/candidate", json={"version": TWIN}, headers=ADMIN, timeout=90)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{base}/rollout", json={"shadow": 1.0, "canary": 0.5}, headers=ADMIN, timeout=30)
        assert r.status_code == 200, r.text
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    for group in ("recording.yml",):  # evaluate the recording rules every second too
        rules = yaml.safe_load((PROM / group).read_text())
        for g in rules["groups"]:
            g["interval"] = "1s"
        (tmp / group).write_text(yaml.safe_dump(rules))
    config["rule_files"][0] = str(tmp / "recording.yml")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "log", "wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp / "log").read_text()[-2000:]
            time.sleep(0.3)
        yield server, url
    finally:
        prom.terminate()
        prom.wait(20)
        server.stop()


def send_traffic(base: str) -> None:
    seven = (FIXTURES / "mnist_test0_label7.png").read_bytes()
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(5):
            for client in range(4):  # canary clients and primary clients
                who = {"X-Client-Id": f"client-{i}-{client}"}
                assert (
                    c.post("/classify", files={"image": ("7.png", seven, "image/png")}, headers=who).status_code == 200
                )
                assert c.post("/generate", json={"n": 2}, headers=who).status_code == 200
            assert c.post("/generate", json={"n": 4}, headers={"X-Priority": "batch"}).status_code == 200
            assert c.post("/classify", json={"text": "a gorgeous film"}).status_code == 200
            assert c.post("/generate", json={"n": 4, "seed": 1}).status_code == 200
            code = c.post("/compress", files={"image": ("7.png", seven, "image/png")}).json()["code"]
            assert c.post("/decompress", json={"code": code}).status_code == 200
            assert c.post("/denoise", files={"image": ("7.png", seven, "image/png")}).status_code == 200
            assert c.post("/generate", json={"n": 0}).status_code == 400  # a rejection, for its panel


def rfc3339(stamp: str) -> float:
    """Prometheus' timestamps ("2026-11-29T21:15:27.123456789Z" or with an offset) -> epoch seconds."""
    import datetime
    import re

    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", stamp)
    if not m:
        return 0.0
    zone = "+00:00" if m.group(3) in (None, "Z") else m.group(3)
    base = datetime.datetime.fromisoformat(m.group(1) + zone).timestamp()
    return base + float(m.group(2) or 0)


def query(url: str, expr: str) -> list:
    body = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def test_prometheus_scrapes_deepserve_and_every_rule_and_panel_has_data(stack):
    server, url = stack
    deadline = time.monotonic() + 60
    while not query(url, 'up{job="deepserve"} == 1'):
        assert time.monotonic() < deadline, "Prometheus never scraped deepserve"
        time.sleep(0.5)
    scrapes = lambda: float(query(url, 'count_over_time(up{job="deepserve"}[10m])')[0]["value"][1])
    for _ in range(3):  # spread over several scrapes, so rate() has two points per series
        seen = scrapes()
        send_traffic(server.url)
        while scrapes() <= seen:  # wait for the next scrape, not a fixed time
            assert time.monotonic() < deadline + 60, "Prometheus stopped scraping"
            time.sleep(0.2)

    def evaluated_after(t: float) -> bool:  # every rule group has been evaluated since t
        groups = httpx.get(url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        return all(rfc3339(g.get("lastEvaluation", "")) > t for g in groups)

    last_traffic = time.time()
    seen = scrapes()
    while scrapes() <= seen or not evaluated_after(last_traffic):  # a last scrape and a rule evaluation
        assert time.monotonic() < deadline + 90, "no scrape or rule evaluation after the traffic"
        time.sleep(0.2)

    groups = httpx.get(url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    declared = sum(
        len(g["rules"])
        for f in ("recording.yml", "alerts.yml")
        for g in yaml.safe_load((REPO / "deploy" / "prometheus" / f).read_text())["groups"]
    )
    assert len(rules) == declared and all(r["health"] == "ok" for r in rules), [
        (r["name"], r.get("lastError")) for r in rules
    ]
    empty = [r["name"] for r in rules if r["type"] == "recording" and not query(url, r["name"])]
    assert not empty, f"recording rules with no data: {empty}"
    firing = query(url, 'ALERTS{alertstate="firing"}')
    assert not firing, f"a healthy service fired alerts: {firing}"

    no_data = [expr for expr in dashboard_queries() if not query(url, expr)]
    assert not no_data, f"dashboard queries with no data: {no_data}"
    providers = {r["metric"]["provider"] for r in query(url, "deepserve_model_info")}
    assert providers == {"CPUExecutionProvider"}
