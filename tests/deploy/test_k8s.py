"""deploy/k8s validates offline against the Kubernetes schemas, and its parts fit together."""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
VERSION = "1.30.0"
CRDS = {"ServiceMonitor"}  # not in the core schemas: checked by test_service_monitor_selects_the_service


def docs() -> dict[str, dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


DOCS = docs()


@pytest.mark.parametrize("key", [k for k, d in DOCS.items() if d["kind"] not in CRDS])
def test_manifest_is_valid_against_the_kubernetes_schema(key):
    kubernetes_validate.validate(DOCS[key], VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest():
    broken = copy.deepcopy(DOCS["Deployment/deepserve"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"not": "a port"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)
    broken = copy.deepcopy(DOCS["Deployment/deepserve"])
    broken["spec"]["replicaz"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def container(deployment: str) -> dict:
    return DOCS[f"Deployment/{deployment}"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", ["deepserve", "deepserve-gpu"])
def test_deployment_probes_resources_and_graceful_termination(name):
    dep = DOCS[f"Deployment/{name}"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    c = container(name)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and c["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    timeout = float(env.get("DEEPSERVE_REQUEST_TIMEOUT_S", 30))
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > timeout + pre_stop


@pytest.mark.parametrize("name", ["deepserve", "deepserve-gpu"])
def test_both_deployments_fail_closed_and_set_the_connection_timeouts(name):
    """No pod starts without the API key Secret (not optional), the key is read from the
    mounted file, and the keep-alive outlives the load balancer's idle timeout (60 s)."""
    spec = DOCS[f"Deployment/{name}"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in container(name)["env"]}
    assert "DEEPSERVE_API_KEY" not in env  # not from an optional env var
    key_file = env["DEEPSERVE_API_KEY_FILE"]["value"]
    volume = next(v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "deepserve")
    assert volume["secret"]["optional"] is False
    mount = next(m for m in container(name)["volumeMounts"] if m["name"] == volume["name"])
    assert key_file == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    assert int(env["DEEPSERVE_KEEP_ALIVE_S"]["value"]) > 60
    assert int(env["DEEPSERVE_GRACEFUL_SHUTDOWN_S"]["value"]) + 30 + 5 < spec["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("name", ["deepserve", "deepserve-gpu"])
def test_every_replica_follows_one_model_directory(name):
    """A swap reaches every replica: the model directory is one shared volume, seeded once."""
    spec = DOCS[f"Deployment/{name}"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in container(name)["env"]}
    mount = next(m for m in container(name)["volumeMounts"] if m["name"] == "models")
    assert env["DEEPSERVE_EXPORTED_DIR"]["value"] == mount["mountPath"]
    volume = next(v for v in spec["volumes"] if v["name"] == "models")
    claim = DOCS[f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    seed = spec["initContainers"][0]
    assert seed["volumeMounts"][0]["name"] == "models" and "manifest.json" in seed["command"][-1]


def test_the_ingress_limits_headers_buffers_uploads_and_retries_model_calls():
    ing = DOCS["Ingress/deepserve"]
    notes = ing["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "on"
    assert "non_idempotent" in notes["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "deepserve"
    controller = DOCS["ConfigMap/ingress-nginx-controller"]["data"]
    assert int(controller["client-header-timeout"]) <= 10 and "large-client-header-buffers" in controller


def test_gpu_variant_asks_for_a_gpu_and_refuses_cpu_fallback():
    c = container("deepserve-gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "DEEPSERVE_DEVICE", "value": "cuda"} in c["env"]


def test_service_hpa_and_pdb_point_at_the_deployment():
    pod_labels = DOCS["Deployment/deepserve"]["spec"]["template"]["metadata"]["labels"]
    svc = DOCS["Service/deepserve"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container("deepserve")["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    assert DOCS["HorizontalPodAutoscaler/deepserve"]["spec"]["scaleTargetRef"]["name"] == "deepserve"
    hpa = DOCS["HorizontalPodAutoscaler/deepserve"]["spec"]
    assert hpa["minReplicas"] >= DOCS["PodDisruptionBudget/deepserve"]["spec"]["minAvailable"] + 1
    assert DOCS["PodDisruptionBudget/deepserve"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_service_monitor_selects_the_service():
    sm = DOCS["ServiceMonitor/deepserve"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = DOCS["Service/deepserve"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert all(e["path"] == "/metrics" for e in sm["spec"]["endpoints"])


BENTOFILES = {"deepserve": REPO / "bentofile.yaml", "deepserve-gpu": REPO / "deploy" / "bentofile-gpu.yaml"}


@pytest.mark.parametrize("name", ["deepserve", "deepserve-gpu"])
def test_k8s_runs_the_image_the_way_the_container_tests_ran_it(name):
    """No drift between deploy/k8s and the image tests/container starts: the tag make image
    gives, BentoML's user and port, the probes, the env names, the Bento's paths, a read-only
    root with /tmp writable, the models on a volume at DEEPSERVE_EXPORTED_DIR."""
    from bentoml._internal.container.generate import BENTO_PATH, BENTO_UID_GID

    from service.settings import Settings
    from tests.container import conftest as containers

    spec = DOCS[f"Deployment/{name}"]["spec"]["template"]["spec"]
    c, seed = container(name), spec["initContainers"][0]
    bento = yaml.safe_load(BENTOFILES[name].read_text())
    assert c["image"] == seed["image"] == f"{bento['name']}:latest"  # deploy/image/build.sh tags <name>:latest
    assert spec["securityContext"]["runAsUser"] == spec["securityContext"]["fsGroup"] == BENTO_UID_GID == containers.UID
    assert [p["containerPort"] for p in c["ports"]] == [3000]  # BentoML's port, what the tests publish
    assert (c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]) == ("/readyz", "/livez")
    names = {e["name"] for e in c["env"]}
    settings = {f"DEEPSERVE_{field.upper()}" for field in Settings.model_fields}
    ours = {n for n in names if n.startswith("DEEPSERVE_")}
    assert ours <= settings, f"not a setting: {ours - settings}"
    assert names - ours <= {e["name"] for e in bento["envs"]}, names - ours  # the image's own (bentofile)
    assert "BENTOML_HOME" not in names  # the image's: /tmp/bentoml (bentofile), the tests check it there
    assert {"name": "BENTOML_HOME", "value": "/tmp/bentoml"} in bento["envs"]
    # the seed copies the Bento's models (the tests seed their volume with this very command)
    assert seed["command"] == containers.k8s_seed_command() or name != "deepserve"
    assert f"{BENTO_PATH}/src/exported/. /models/" in seed["command"][-1]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert env["DEEPSERVE_EXPORTED_DIR"] == "/models" and mounts["/models"] == "models"
    # read-only root, /tmp writable (an emptyDir in memory: the tests' --tmpfs /tmp)
    assert (
        c["securityContext"]["readOnlyRootFilesystem"] is True
        and c["securityContext"]["allowPrivilegeEscalation"] is False
    )
    tmp = next(v for v in spec["volumes"] if v["name"] == mounts["/tmp"])
    assert tmp["emptyDir"]["medium"] == "Memory"


def test_the_runbooks_image_paths_are_the_images():
    """Every path into the image that the docs and manifests name is under the Bento's path and
    exists in the Bento (src/ is this checkout's included files)."""
    from bentoml._internal.container.generate import BENTO_PATH

    texts = [REPO / "docs" / "operations.md", *sorted((REPO / "deploy").rglob("*.yaml"))]
    found = set()
    for path in texts:
        found |= set(re.findall(r"/home/bentoml/[\w./-]*\w", path.read_text()))
    assert found, "no image path named anywhere"
    for p in sorted(found - {BENTO_PATH}):
        assert p.startswith(f"{BENTO_PATH}/src/"), p
        assert (REPO / p.removeprefix(f"{BENTO_PATH}/src/")).exists(), p
