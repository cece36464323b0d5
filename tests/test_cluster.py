"""The cluster files: launcher YAMLs against the schema shipped inside `ray`, the KubeRay RayJob
against the RayJob CRD's OpenAPI schema (KubeRay v1.6.2, tests/data/kuberay), the image recipe,
and what a working, authenticated GPU cluster needs from each file."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER = sorted(p for p in CLUSTER.glob("*.yaml") if "kuberay" not in p.name)
KUBERAY = sorted(CLUSTER.glob("kuberay*.yaml"))
DOCKERFILE = CLUSTER / "Dockerfile"
RAYJOB_SCHEMA = ROOT / "tests" / "data" / "kuberay" / "rayjob-crd-v1.6.2.openapi.json"
TOKEN_PATH = "/home/ray/.ray/auth_token"  # where `ray start` looks in the rayproject/ray images
DLAMI_SSM = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/"


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _by_provider(kind: str) -> dict:
    return next(c for c in map(_load, LAUNCHER) if c["provider"]["type"] == kind)


def _pyproject(pattern: str) -> str:
    """The first group of `pattern` in pyproject.toml (tomllib needs Python 3.11)."""
    return re.search(pattern, (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def _ray_pin() -> str:
    return _pyproject(r'^\s*"ray\[[^\]]*\]==([^"]+)"')


def _dockerfile() -> dict:
    """FROM image, last WORKDIR and the RUN instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return {"from": [ln.split()[1] for ln in lines if ln.startswith("FROM ")],
            "workdir": [ln.split()[1] for ln in lines if ln.startswith("WORKDIR ")][-1],
            "run": [ln[4:] for ln in lines if ln.startswith("RUN ")]}


def _image_tag() -> str:
    """The tag convention: the project image repeats the tag of the Ray image it is built on."""
    return _dockerfile()["from"][0].split(":", 1)[1]


def test_configs_for_aws_gcp_and_kuberay_exist():
    providers = {_load(p)["provider"]["type"] for p in LAUNCHER}
    assert providers >= {"aws", "gcp"} and KUBERAY and DOCKERFILE.is_file()


# --------------------------------------------------------------------- the image recipe ---

def test_dockerfile_builds_on_the_ray_gpu_image_of_the_pinned_version():
    froms = _dockerfile()["from"]
    assert len(froms) == 1
    assert re.fullmatch(rf"rayproject/ray:{re.escape(_ray_pin())}-py3\d+-gpu", froms[0]), froms


def test_dockerfile_installs_a_cuda12_torch_before_the_gpu_extra():
    runs = _dockerfile()["run"]
    cpu_torch = _pyproject(r'^cpu = \[.*"(torch==[^"]+)"')  # the version the CPU extra pins
    torch_step = next(i for i, r in enumerate(runs) if cpu_torch in r)
    extra_step = next(i for i, r in enumerate(runs) if "'.[gpu]'" in r or '".[gpu]"' in r)
    assert torch_step < extra_step
    text = DOCKERFILE.read_text()
    index = re.search(r"TORCH_INDEX_URL=(\S+)", text).group(1)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", index)
    assert "--index-url" in runs[torch_step]


# ------------------------------------------------------------ Ray cluster launcher files ---

@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_is_valid_and_autoscales_gpus(path):
    config = _load(path)
    jsonschema.validate(config, _schema())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # CPU head, no training
    gpu_types = [t for n, t in types.items() if n.startswith("gpu")]
    assert gpu_types and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu_types)
    assert config["idle_timeout_minutes"] > 0
    setup = config["setup_commands"]
    torch_step = next(i for i, c in enumerate(setup) if re.search(r"whl/cu12\d\b", c))
    assert "torch==" in setup[torch_step]
    assert torch_step < next(i for i, c in enumerate(setup) if "[gpu]" in c)
    assert "ray job submit" in path.read_text() and "ray down" in path.read_text()


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_uses_the_ray_image_of_the_pinned_version(path):
    image = _load(path)["docker"]["image"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(_ray_pin())}-py3\d+-gpu", image)


def test_the_schema_check_rejects_a_broken_config():
    config = _load(LAUNCHER[0])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["bogus_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())
    del broken["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())


def _launcher_auth_problems(config: dict) -> list[str]:
    """Token auth on every node (docker env for all Ray processes, the token file mounted where
    `ray start` reads it) and the dashboard on 0.0.0.0 only with it."""
    docker = config.get("docker", {})
    options = " ".join(docker.get("run_options", []))
    auth_on = bool(re.search(r"(--env[= ]|-e )RAY_AUTH_MODE=token\b", options))
    problems = [] if auth_on else ["RAY_AUTH_MODE=token is not in docker.run_options"]
    if config.get("file_mounts", {}).get(TOKEN_PATH) != "~/.ray/auth_token":
        problems.append(f"file_mounts does not put ~/.ray/auth_token at {TOKEN_PATH}")
    for command in config.get("head_start_ray_commands", []):
        if re.search(r"--dashboard-host[= ](0\.0\.0\.0|::)", command) and not auth_on:
            problems.append("dashboard bound to all interfaces without token auth")
    return problems


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_turns_on_token_auth_on_every_node(path):
    assert _launcher_auth_problems(_load(path)) == []


def test_the_auth_check_rejects_an_open_dashboard():
    config = _load(LAUNCHER[0])
    config["docker"]["run_options"] = ["--ulimit nofile=65536:65536"]
    assert any("dashboard" in p for p in _launcher_auth_problems(config))
    del config["file_mounts"][TOKEN_PATH]
    assert len(_launcher_auth_problems(config)) == 3


def _aws_problems(config: dict) -> list[str]:
    problems = []
    images = set()
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        image = node.get("ImageId", "")
        images.add(image)
        if not (re.fullmatch(r"ami-[0-9a-f]{8,17}", image)
                or image.startswith(f"resolve:ssm:{DLAMI_SSM}")):
            problems.append(f"{name}: ImageId {image!r} is neither an AMI id nor the DLAMI "
                            "SSM parameter")
        profile = node.get("IamInstanceProfile", {})
        if not (profile.get("Name") or profile.get("Arn")):
            problems.append(f"{name}: no IamInstanceProfile")
    if len(images) > 1:
        problems.append(f"node types use different images: {sorted(images)}")
    return problems


def test_aws_every_node_type_has_the_dlami_and_an_instance_profile():
    assert _aws_problems(_by_provider("aws")) == []


def test_the_aws_check_rejects_missing_ami_and_profile():
    config = _by_provider("aws")
    worker = next(n for n in config["available_node_types"] if n.startswith("gpu"))
    del config["available_node_types"][worker]["node_config"]["ImageId"]
    del config["available_node_types"][worker]["node_config"]["IamInstanceProfile"]
    assert len(_aws_problems(config)) == 3


def test_aws_head_may_launch_workers_with_their_profile_and_image():
    config = _by_provider("aws")
    head = config["head_node_type"]
    workers = {t["node_config"]["IamInstanceProfile"]["Name"]
               for n, t in config["available_node_types"].items() if n != head}
    head_profile = config["available_node_types"][head]["node_config"]["IamInstanceProfile"]
    policies = {p.name: json.loads(p.read_text()) for p in (CLUSTER / "aws-iam").glob("*.json")}
    head_policy = policies["head-launch-workers.json"]["Statement"]
    passable = {s["Resource"].rsplit("/", 1)[1] for s in head_policy
                if s["Action"] == "iam:PassRole"}
    assert workers == passable and head_profile["Name"] not in workers
    # EC2 resolves `resolve:ssm:` image ids with the launching principal's permissions
    readable = [s["Resource"] for s in head_policy if "ssm:GetParameters" in s["Action"]]
    assert any(DLAMI_SSM.startswith(r.split("::parameter", 1)[1].rstrip("*")) for r in readable)
    readme = (CLUSTER / "README.md").read_text()
    assert all(name in readme for name in workers | {head_profile["Name"]})
    assert f"{DLAMI_SSM}latest/ami-id" in readme


def _gcp_problems(config: dict) -> list[str]:
    problems = []
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        accounts = node.get("serviceAccounts")
        if not (isinstance(accounts, list) and accounts
                and all(a.get("email") and a.get("scopes") for a in accounts)):
            problems.append(f"{name}: no serviceAccounts")
        scheduling = node.get("scheduling", {})
        if not isinstance(scheduling, dict):  # the GCE API takes one Scheduling object
            problems.append(f"{name}: scheduling is a {type(scheduling).__name__}, not a mapping")
            continue
        if scheduling.get("provisioningModel") == "SPOT" and scheduling.get("automaticRestart"):
            problems.append(f"{name}: spot VMs cannot restart automatically")
        if not name.startswith("gpu"):
            continue
        if scheduling.get("onHostMaintenance") != "TERMINATE":
            problems.append(f"{name}: GPU VMs need scheduling.onHostMaintenance TERMINATE")
        metadata = {i["key"]: i["value"] for i in node.get("metadata", {}).get("items", [])}
        if metadata.get("install-nvidia-driver") != "True":
            problems.append(f"{name}: no install-nvidia-driver metadata")
        if "deeplearning-platform-release" not in json.dumps(node.get("disks", [])):
            problems.append(f"{name}: not a Deep Learning VM image")
        resources = node_type["resources"]
        if not (resources.get("GPU", 0) > 0 and resources.get("CPU", 0) > 0):
            problems.append(f"{name}: the GCP provider needs CPU and GPU in resources")
    return problems


def test_gcp_node_types_have_service_accounts_scheduling_and_drivers():
    assert _gcp_problems(_by_provider("gcp")) == []


def test_the_gcp_check_rejects_a_scheduling_list_and_missing_driver():
    config = _by_provider("gcp")
    worker = next(n for n in config["available_node_types"] if n.startswith("gpu"))
    node = config["available_node_types"][worker]["node_config"]
    node["scheduling"] = [{"provisioningModel": "SPOT"}, {"onHostMaintenance": "TERMINATE"}]
    del node["serviceAccounts"]
    assert len(_gcp_problems(config)) == 2
    node["scheduling"] = {"onHostMaintenance": "MIGRATE"}
    node["metadata"] = {"items": []}
    config["available_node_types"][worker]["resources"] = {}
    assert len(_gcp_problems(config)) == 4


# ---------------------------------------------------------------------------- KubeRay ---

def _strict(schema):
    """kubectl's strict field validation: an object schema that lists its properties takes no
    others (the CRD leaves additionalProperties unset, which JSON Schema reads as allowed)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _rayjob_validator() -> jsonschema.Draft7Validator:
    doc = json.loads(RAYJOB_SCHEMA.read_text())
    assert doc["kuberay_version"] == "v1.6.2"
    return jsonschema.Draft7Validator(_strict(doc["openAPIV3Schema"]))


def _errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _rayjob_validator().iter_errors(doc)]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _pod_templates(doc: dict) -> dict[str, dict]:
    cluster = _cluster_spec(doc)
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    if "submitterPodTemplate" in doc["spec"]:
        templates["submitter"] = doc["spec"]["submitterPodTemplate"]
    return templates


def _ray_containers(doc: dict) -> dict[str, dict]:
    """The Ray container (the first one) of the head and of each worker group."""
    return {n: t["spec"]["containers"][0] for n, t in _pod_templates(doc).items()
            if n != "submitter"}


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_matches_the_rayjob_crd_schema(path):
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert _errors(doc) == []


def test_the_crd_schema_check_rejects_unknown_fields_and_wrong_types():
    doc = _load(KUBERAY[0])
    broken = copy.deepcopy(doc)
    broken["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    broken["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    errors = _errors(broken)
    assert len(errors) == 3, errors


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_has_what_the_operator_requires(path):
    doc = _load(path)
    spec = doc["spec"]
    assert "jobs.train" in spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    cluster = _cluster_spec(doc)
    assert cluster["rayVersion"] == _ray_pin()
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for name, template in _pod_templates(doc).items():
        for c in template["spec"]["containers"]:
            assert c.get("name") and c.get("image"), f"{name}: container needs name and image"
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in _ray_containers(doc).values()]
    assert any(gpus)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_pods_use_the_project_image(path):
    doc = _load(path)
    for name, template in _pod_templates(doc).items():
        for c in template["spec"]["containers"]:
            repo, _, tag = c["image"].rpartition(":")
            assert repo.endswith("/gensr-ray") and tag == _image_tag(), (name, c["image"])
    readme = (CLUSTER / "README.md").read_text()
    assert f"docker build -f cluster/Dockerfile -t YOUR-REGISTRY/gensr-ray:{_image_tag()} ." \
        in readme


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_pods_mount_a_memory_dev_shm_and_name_a_service_account(path):
    doc = _load(path)
    for name, template in _pod_templates(doc).items():
        assert template["spec"].get("serviceAccountName"), f"{name}: no serviceAccountName"
    for name, container in _ray_containers(doc).items():
        volumes = {v["name"]: v for v in _pod_templates(doc)[name]["spec"].get("volumes", [])}
        shm = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{name}: /dev/shm is not mounted"
        assert volumes[shm[0]].get("emptyDir", {}).get("medium") == "Memory", name


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_turns_on_token_auth_everywhere(path):
    doc = _load(path)
    cluster = _cluster_spec(doc)
    auth = cluster.get("authOptions", {})
    assert auth.get("mode") == "token" and auth.get("secretName")
    for name, container in _ray_containers(doc).items():
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": auth["secretName"], "key": "auth_token"}, name
        # storage keys, when a Secret holds them, arrive as env; pods start without it
        assert {"secretRef": {"name": "gensr-storage", "optional": True}} in container["envFrom"]
    host = cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host", "")
    assert host in ("", "127.0.0.1", "localhost") or auth.get("mode") == "token"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_job_writes_to_object_storage_from_the_image_working_dir(path):
    doc = _load(path)
    args = shlex.split(doc["spec"]["entrypoint"])
    out = args[args.index("--out") + 1]
    sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
    for uri in (out, sets["scale.storage_path"]):
        assert re.fullmatch(r"(s3|gs)://[^/]+/\S*", uri), uri
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _dockerfile()["workdir"]
    assert runtime_env["env_vars"] == _load(ROOT / "jobs" / "runtime_env.yaml")["env_vars"]
