"""The cluster files: launcher YAMLs against the schema shipped inside `ray`, the KubeRay RayJob
against the RayJob CRD's OpenAPI schema (KubeRay v1.6.2, tests/data/kuberay), the image recipe,
and what a working, authenticated GPU cluster needs from each file, with its ports closed to
everything outside the cluster."""

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
README = CLUSTER / "README.md"
TOKEN_PATH = "/home/ray/.ray/auth_token"  # where `ray start` looks in the rayproject/ray images
DLAMI_SSM = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/"
LOOPBACK = ("127.0.0.1", "localhost")
GCP_NETWORK = "gensr-ray"  # the VPC network, its subnetwork and the nodes' network tag
DASHBOARD_PORT = 8265


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _manifest(path: Path) -> list[dict]:
    """The documents of a Kubernetes manifest (`kubectl apply -f` applies them all)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _rayjob(path: Path) -> dict:
    (job,) = [d for d in _manifest(path) if d["kind"] == "RayJob"]
    return job


def _by_provider(kind: str) -> dict:
    return next(c for c in map(_load, LAUNCHER) if c["provider"]["type"] == kind)


def _pyproject(pattern: str) -> str:
    """The first group of `pattern` in pyproject.toml (tomllib needs Python 3.11)."""
    return re.search(pattern, (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)


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
    """Token auth on every node: RAY_AUTH_MODE=token in every node's container (the docker run
    options of all node types), set to nothing else anywhere, and the token file mounted where
    `ray start` reads it."""
    options = " ".join(config.get("docker", {}).get("run_options", []))
    auth_on = bool(re.search(r"(--env[= ]|-e )RAY_AUTH_MODE=token\b", options))
    problems = [] if auth_on else ["RAY_AUTH_MODE=token is not in docker.run_options"]
    if config.get("file_mounts", {}).get(TOKEN_PATH) != "~/.ray/auth_token":
        problems.append(f"file_mounts does not put ~/.ray/auth_token at {TOKEN_PATH}")
    # a later run option, a node type's docker options or a start command may override it
    for mode in re.findall(r"RAY_AUTH_MODE=(\w*)", yaml.safe_dump(config)):
        if mode != "token":
            problems.append(f"RAY_AUTH_MODE={mode} somewhere in the config")
    return problems


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_turns_on_token_auth_on_every_node(path):
    assert _launcher_auth_problems(_load(path)) == []


def test_the_auth_check_rejects_a_node_without_token_auth():
    config = _load(LAUNCHER[0])
    config["docker"]["run_options"] = ["--ulimit nofile=65536:65536"]
    assert _launcher_auth_problems(config) == ["RAY_AUTH_MODE=token is not in docker.run_options"]
    del config["file_mounts"][TOKEN_PATH]
    worker = next(n for n in config["available_node_types"] if n.startswith("gpu"))
    config["available_node_types"][worker]["docker"] = {
        "worker_run_options": ["--env=RAY_AUTH_MODE=disabled"]}
    assert len(_launcher_auth_problems(config)) == 3


def _gcloud(text: str, command: str) -> list[dict[str, str]]:
    """The flags of each `gcloud COMMAND NAME --flag value ...` in `text` (continuation lines
    joined); the positional NAME under "name"."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        if not line.startswith(f"gcloud {command} "):
            continue
        args = shlex.split(line, comments=True)
        if args[:len(command.split()) + 1] != ["gcloud", *command.split()]:
            continue
        rest = args[len(command.split()) + 1:]
        flags = {"name": rest[0]} if rest and not rest[0].startswith("--") else {}
        for i, arg in enumerate(rest):
            if arg.startswith("--"):
                key, _, value = arg[2:].partition("=")
                has_value = i + 1 < len(rest) and not rest[i + 1].startswith("--")
                flags[key] = value or (rest[i + 1] if has_value else "")
        found.append(flags)
    return found


def _launcher_network_problems(config: dict) -> list[str]:
    """The dashboard / job server bound to the head's loopback, and only cluster nodes (plus
    SSH) admitted on any other port: the AWS security group the launcher makes with no extra
    rule, the GCP nodes on their own tagged subnetwork."""
    problems = []
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    for command in commands:
        host = re.search(r"--dashboard-host[= ](\S+)", command)
        if host and host.group(1) not in LOOPBACK:
            problems.append(f"dashboard bound to {host.group(1)}: {command}")
    heads = [c for c in config["head_start_ray_commands"] if re.match(r"ray start .*--head", c)]
    if len(heads) != 1 or not re.search(rf"--dashboard-host[= ]({'|'.join(LOOPBACK)})\b",
                                        heads[0]):
        problems.append("the head's `ray start` does not bind the dashboard to the loopback")
    types = config["available_node_types"]
    provider = config["provider"]
    if provider["type"] == "aws":
        group = provider.get("security_group", {})
        if not group.get("GroupName"):
            problems.append("provider.security_group.GroupName is not set")
        for rule in group.get("IpPermissions", []):  # the launcher adds them to its defaults
            if set(rule) & {"IpRanges", "Ipv6Ranges", "PrefixListIds"}:
                problems.append(f"security_group admits addresses outside the cluster: {rule}")
        for name, node_type in types.items():
            node = node_type["node_config"]
            if "SecurityGroupIds" in node or "NetworkInterfaces" in node:
                problems.append(f"{name}: its own security groups replace the cluster's")
    if provider["type"] == "gcp":
        subnetwork = f"/regions/{provider['region']}/subnetworks/{GCP_NETWORK}"
        for name, node_type in types.items():
            node = node_type["node_config"]
            if GCP_NETWORK not in node.get("tags", {}).get("items", []):
                problems.append(f"{name}: no network tag {GCP_NETWORK}")
            interfaces = node.get("networkInterfaces") or [{}]  # none: the launcher's pick
            if not all(str(i.get("subnetwork", "")).endswith(subnetwork) for i in interfaces):
                problems.append(f"{name}: not on the subnetwork ...{subnetwork}")
    return problems


def _gcp_firewall_problems(readme: str, region: str) -> list[str]:
    """The network, subnetwork and firewall rules the README creates for the GCP nodes: all
    traffic between nodes tagged gensr-ray, SSH alone from addresses outside."""
    problems = []
    networks = _gcloud(readme, "compute networks create")
    if not any(n["name"] == GCP_NETWORK and n.get("subnet-mode") == "custom" for n in networks):
        problems.append(f"no custom-mode network {GCP_NETWORK}")
    subnets = _gcloud(readme, "compute networks subnets create")
    if not any(s["name"] == GCP_NETWORK and s.get("network") == GCP_NETWORK
               and s.get("region") == region for s in subnets):
        problems.append(f"no subnetwork {GCP_NETWORK} in {region}")
    rules = [r for r in _gcloud(readme, "compute firewall-rules create")
             if r.get("network") == GCP_NETWORK]
    for rule in rules:
        name = rule["name"]
        if rule.get("direction", "INGRESS") != "INGRESS" or "allow" in rule:
            problems.append(f"{name}: not an --action ALLOW INGRESS rule")
        if rule.get("target-tags") != GCP_NETWORK:
            problems.append(f"{name}: applies to other VMs than the nodes ({rule.get('target-tags')})")
        if "source-ranges" in rule:
            if rule.get("rules") != "tcp:22" or "source-tags" in rule:
                problems.append(f"{name}: admits more than SSH from outside the cluster")
        elif rule.get("source-tags") != GCP_NETWORK:
            # gcloud admits 0.0.0.0/0 when a rule names no source
            problems.append(f"{name}: its sources are not the cluster's nodes")
    if not any(r.get("source-tags") == GCP_NETWORK and "source-ranges" not in r for r in rules):
        problems.append("no rule admits traffic between the nodes")
    return problems


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_keeps_the_dashboard_on_loopback_and_ports_within_the_cluster(path):
    config = _load(path)
    assert _launcher_network_problems(config) == []
    if config["provider"]["type"] == "gcp":
        assert _gcp_firewall_problems(README.read_text(), config["provider"]["region"]) == []
    assert "NCCL_SOCKET_IFNAME" in README.read_text()  # why it is left unset


def test_the_network_check_rejects_an_open_dashboard_and_open_ports():
    aws = _by_provider("aws")
    aws["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1",
                                                "--dashboard-host=0.0.0.0")
                                      for c in aws["head_start_ray_commands"]]
    aws["provider"]["security_group"]["IpPermissions"] = [
        {"IpProtocol": "tcp", "FromPort": 6379, "ToPort": 6379,
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    worker = next(n for n in aws["available_node_types"] if n.startswith("gpu"))
    aws["available_node_types"][worker]["node_config"]["SecurityGroupIds"] = ["sg-0123"]
    assert len(_launcher_network_problems(aws)) == 4

    gcp = _by_provider("gcp")
    worker = next(n for n in gcp["available_node_types"] if n.startswith("gpu"))
    node = gcp["available_node_types"][worker]["node_config"]
    del node["tags"], node["networkInterfaces"]  # the launcher would pick the default network
    assert len(_launcher_network_problems(gcp)) == 2

    readme, region = README.read_text(), gcp["provider"]["region"]
    assert len(_gcp_firewall_problems(readme.replace("--rules tcp:22", "--rules all"),
                                      region)) == 1
    assert len(_gcp_firewall_problems(readme.replace("--source-tags gensr-ray ", ""),
                                      region)) == 2
    assert len(_gcp_firewall_problems(readme.replace("--target-tags gensr-ray", ""),
                                      region)) == 2


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
    doc = _rayjob(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert _errors(doc) == []


def test_the_crd_schema_check_rejects_unknown_fields_and_wrong_types():
    doc = _rayjob(KUBERAY[0])
    broken = copy.deepcopy(doc)
    broken["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    broken["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    errors = _errors(broken)
    assert len(errors) == 3, errors


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_has_what_the_operator_requires(path):
    doc = _rayjob(path)
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
    doc = _rayjob(path)
    for name, template in _pod_templates(doc).items():
        for c in template["spec"]["containers"]:
            repo, _, tag = c["image"].rpartition(":")
            assert repo.endswith("/gensr-ray") and tag == _image_tag(), (name, c["image"])
    readme = (CLUSTER / "README.md").read_text()
    assert f"docker build -f cluster/Dockerfile -t YOUR-REGISTRY/gensr-ray:{_image_tag()} ." \
        in readme


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_pods_mount_a_memory_dev_shm_and_name_a_service_account(path):
    doc = _rayjob(path)
    for name, template in _pod_templates(doc).items():
        assert template["spec"].get("serviceAccountName"), f"{name}: no serviceAccountName"
    for name, container in _ray_containers(doc).items():
        volumes = {v["name"]: v for v in _pod_templates(doc)[name]["spec"].get("volumes", [])}
        shm = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{name}: /dev/shm is not mounted"
        assert volumes[shm[0]].get("emptyDir", {}).get("medium") == "Memory", name


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_turns_on_token_auth_everywhere(path):
    doc = _rayjob(path)
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
    # KubeRay binds the dashboard to 0.0.0.0 unless told otherwise
    host = cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0")
    if host not in LOOPBACK:
        assert _network_policy_problems(_manifest(path)) == []


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_job_writes_to_object_storage_from_the_image_working_dir(path):
    doc = _rayjob(path)
    args = shlex.split(doc["spec"]["entrypoint"])
    out = args[args.index("--out") + 1]
    sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
    for uri in (out, sets["scale.storage_path"]):
        assert re.fullmatch(r"(s3|gs)://[^/]+/\S*", uri), uri
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _dockerfile()["workdir"]
    assert runtime_env["env_vars"] == _load(ROOT / "jobs" / "runtime_env.yaml")["env_vars"]


_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_POLICY_FIELDS = {  # what networking.k8s.io/v1 NetworkPolicy takes, at each level this file uses
    "spec": {"podSelector", "policyTypes", "ingress", "egress"},
    "rule": {"from", "ports"},
    "peer": {"podSelector", "namespaceSelector", "ipBlock"},
    "selector": {"matchLabels", "matchExpressions"},
    "port": {"protocol", "port", "endPort"},
}


def _policy_shape_problems(policy: dict) -> list[str]:
    """Fields kubectl's strict validation would refuse, and label keys it would reject."""
    problems = []

    def check(level: str, value: dict, where: str) -> None:
        if not isinstance(value, dict) or set(value) - _POLICY_FIELDS[level]:
            problems.append(f"{where}: not a {level} ({value!r})")
            return
        if level == "selector":
            for key, label in value.get("matchLabels", {}).items():
                if not (_LABEL_KEY.fullmatch(key) and isinstance(label, str)):
                    problems.append(f"{where}: bad label {key}={label!r}")

    if (policy.get("apiVersion"), policy.get("kind")) != ("networking.k8s.io/v1", "NetworkPolicy"):
        problems.append("not a networking.k8s.io/v1 NetworkPolicy")
    spec = policy.get("spec", {})
    check("spec", spec, "spec")
    check("selector", spec.get("podSelector", {}), "spec.podSelector")
    for i, rule in enumerate(spec.get("ingress", [])):
        check("rule", rule, f"ingress[{i}]")
        for j, peer in enumerate(rule.get("from", [])):
            check("peer", peer, f"ingress[{i}].from[{j}]")
            for kind in ("podSelector", "namespaceSelector"):
                if kind in peer:
                    check("selector", peer[kind], f"ingress[{i}].from[{j}].{kind}")
        for j, port in enumerate(rule.get("ports", [])):
            check("port", port, f"ingress[{i}].ports[{j}]")
    return problems


def _network_policy_problems(docs: list[dict]) -> list[str]:
    """A NetworkPolicy selects every Ray pod of the RayJob and admits connections only from
    those pods (any port) and, on the dashboard port alone, from the submitter pod (the Job
    controller's label for the Job that KubeRay names after the RayJob) and the operator."""
    job = next(d for d in docs if d["kind"] == "RayJob")
    name = job["metadata"]["name"]
    labels = [t.get("metadata", {}).get("labels", {})
              for n, t in _pod_templates(job).items() if n != "submitter"]
    port = int(_cluster_spec(job)["headGroupSpec"]["rayStartParams"].get(
        "dashboard-port", DASHBOARD_PORT))
    submitter = {"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": name}}}
    operator = {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}

    def selects_the_ray_pods(selector: dict) -> bool:
        wanted = selector.get("matchLabels", {})
        return (set(selector) == {"matchLabels"} and bool(wanted)
                and all(wanted.items() <= pod.items() for pod in labels))

    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"
                and selects_the_ray_pods(d.get("spec", {}).get("podSelector", {}))]
    if not policies:
        return ["no NetworkPolicy selects every Ray pod of the job"]
    problems = []
    for policy in policies:
        problems += _policy_shape_problems(policy)
        spec = policy["spec"]
        if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
            problems.append("policyTypes leaves ingress open")
        for i, rule in enumerate(spec.get("ingress", [])):
            peers = rule.get("from", [])
            if not peers:
                problems.append(f"ingress[{i}] admits every source")
                continue
            outside = [p for p in peers if p != {"podSelector": spec["podSelector"]}]
            for peer in outside:
                if peer != submitter and not (set(peer) == {"namespaceSelector", "podSelector"}
                                              and peer["podSelector"] == operator):
                    problems.append(f"ingress[{i}] admits {peer}")
            ports = [(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports", [])]
            if outside and ports != [("TCP", port)]:
                problems.append(f"ingress[{i}] admits pods outside the job on ports {ports or 'all'}")
    return problems


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_admits_the_dashboard_only_from_the_job_the_submitter_and_the_operator(path):
    docs = _manifest(path)
    assert [d["kind"] for d in docs] == ["RayJob", "NetworkPolicy"]
    assert _network_policy_problems(docs) == []
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", docs[1]["metadata"]["name"])


def test_the_network_policy_check_rejects_open_rules():
    docs = _manifest(KUBERAY[0])
    job, policy = copy.deepcopy(docs)
    policy["spec"]["ingress"].append({})  # from everywhere
    dashboard_rule = policy["spec"]["ingress"][1]
    dashboard_rule["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}})
    dashboard_rule["from"].append({"namespaceSelector": {}})  # any pod of any namespace
    dashboard_rule["ports"].append({"port": 6379})
    policy["spec"]["podSelector"]["bogus"] = True
    problems = _network_policy_problems([job, policy])
    assert "no NetworkPolicy selects every Ray pod of the job" in problems
    del policy["spec"]["podSelector"]["bogus"]
    problems = _network_policy_problems([job, policy])
    assert len(problems) == 4, problems
    assert any("every source" in p for p in problems)
    assert any("ipBlock" in p for p in problems)
    assert any("'namespaceSelector': {}}" in p for p in problems)
    assert any("6379" in p for p in problems)
    # a worker group whose pods the policy does not select
    job, policy = copy.deepcopy(docs)
    del _cluster_spec(job)["workerGroupSpecs"][0]["template"]["metadata"]
    assert _network_policy_problems([job, policy]) == [
        "no NetworkPolicy selects every Ray pod of the job"]
