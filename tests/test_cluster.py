"""Cluster launcher YAMLs against the schema shipped inside `ray`; KubeRay manifests against
the fields the operator requires."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER = Path(__file__).parent.parent / "cluster"
LAUNCHER = sorted(p for p in CLUSTER.glob("*.yaml") if "kuberay" not in p.name)
KUBERAY = sorted(CLUSTER.glob("kuberay*.yaml"))


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_configs_for_aws_gcp_and_kuberay_exist():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in LAUNCHER}
    assert providers >= {"aws", "gcp"} and KUBERAY


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_is_valid_and_autoscales_gpus(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, _schema())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # CPU head, no training
    gpu_types = [t for n, t in types.items() if n.startswith("gpu")]
    assert gpu_types and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu_types)
    assert config["idle_timeout_minutes"] > 0
    assert any("[gpu]" in cmd for cmd in config["setup_commands"])
    assert "ray job submit" in path.read_text() and "ray down" in path.read_text()


def test_the_schema_check_rejects_a_broken_config():
    config = yaml.safe_load(LAUNCHER[0].read_text())
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["bogus_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())
    del broken["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())


def _check_pod_template(template: dict, where: str) -> None:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: container needs name and image"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_has_what_the_operator_requires(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayJob", "RayCluster")
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
    if doc["kind"] == "RayJob":
        assert "jobs.train" in spec["entrypoint"]
        yaml.safe_load(spec["runtimeEnvYAML"])  # must itself parse
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    _check_pod_template(head["template"], "headGroupSpec")
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        _check_pod_template(group["template"], group["groupName"])
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert any(gpus)
