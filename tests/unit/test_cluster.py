"""The cluster manifests (KubeRay RayCluster, RayJobs, RayService, the AWS launcher): they
parse, token auth is on everywhere, nothing is exposed publicly, images are pinned,
autoscaling is set, and every entrypoint points at a script and a config that exist and
validate with the CLI's own loader."""

import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "cluster" / "kuberay"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def assert_token_auth(container: dict, where: str) -> None:
    env = env_of(container)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "cai-ray-auth", "key": "auth_token"}, where


def assert_pinned(image: str) -> None:
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and any(c.isdigit() for c in tag), image


PART_OF = {"app.kubernetes.io/part-of": "cai-ray"}


def assert_locked_down(template: dict, where: str) -> None:
    """A pod template: labelled for the NetworkPolicy, non-root, no privilege escalation."""
    assert template["metadata"]["labels"] == PART_OF, where
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True, where
    assert template["spec"]["securityContext"]["runAsUser"] != 0, where
    for c in containers(template):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], f"{where}/{c['name']}"


def assert_shm(template: dict, where: str) -> None:
    """A GPU pod: /dev/shm is a memory-backed emptyDir (NCCL and vLLM need more than 64 MiB)."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    [mount] = [m for c in containers(template) for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory", where


def cluster_spec_checks(spec: dict, where: str) -> None:
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head service must not be exposed"
    assert head["rayStartParams"]["num-cpus"] == "0"
    pods = [("head", head["template"])] + [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    for name, tpl in pods:
        assert_locked_down(tpl, f"{where}/{name}")
        for c in containers(tpl):
            assert_token_auth(c, f"{where}/{name}")
            assert_pinned(c["image"])
    # the dashboard binds the pod IP (Kubernetes expands $(VAR) from the container's env), not 0.0.0.0
    host = head["rayStartParams"]["dashboard-host"]
    assert host.startswith("$(") and host.endswith(")"), f"{where}: dashboard-host {host!r}"
    [head_container] = containers(head["template"])
    assert env_of(head_container)[host[2:-1]]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert_token_auth({"env": spec["autoscalerOptions"]["env"]}, f"{where}/autoscaler")
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu and gpu[0]["maxReplicas"] > gpu[0]["minReplicas"]
    for g in spec["workerGroupSpecs"]:
        if "nvidia.com/gpu" in containers(g["template"])[0]["resources"]["limits"]:
            assert_shm(g["template"], f"{where}/{g['groupName']}")
    limits = containers(gpu[0]["template"])[0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1


def test_raycluster():
    doc = load(KUBE / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("ray.io/v1", "RayCluster", "cai-ray")
    cluster_spec_checks(doc["spec"], "raycluster")
    assert {g["groupName"] for g in doc["spec"]["workerGroupSpecs"]} == {"cpu", "gpu"}


def _entry(entrypoint: str) -> tuple[Path, list[str]]:
    """The job script and its arguments from 'cd DIR && python SCRIPT ARGS'."""
    cmd = entrypoint.split("&&")[-1]
    argv = shlex.split(cmd)
    assert argv[0] == "python"
    return ROOT / argv[1], argv[2:]


STAGES = {
    "generate": "generate.py",
    "label": "label.py",
    "sft": "train.py",
    "rm": "train.py",
    "dpo": "train.py",
    "ppo": "train.py",
    "eval": "eval.py",
    "pipeline": "pipeline.py",
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_rayjob_per_stage_runs_an_existing_script_with_a_valid_gpu_config(stage):
    from support.configs import CONFIGS

    from cai_ray import config

    doc = load(KUBE / f"rayjob-{stage}.yaml")
    assert doc["kind"] == "RayJob" and doc["spec"]["clusterSelector"] == {"ray.io/cluster": "cai-ray"}
    script, args = _entry(doc["spec"]["entrypoint"])
    assert script.name == STAGES[stage] and script.exists()
    cfg_path = ROOT / args[args.index("--config") + 1]
    assert cfg_path.exists() and cfg_path.stem.endswith("_gpu")
    cls = CONFIGS[stage]
    config.load_config(cls, cfg_path)
    if script.name == "train.py":
        assert args[0] == stage
    [submitter] = containers(doc["spec"]["submitterPodTemplate"])
    assert_locked_down(doc["spec"]["submitterPodTemplate"], f"rayjob-{stage}/submitter")
    assert_token_auth(submitter, f"rayjob-{stage}/submitter")
    assert_pinned(submitter["image"])


def test_rayservice_serves_the_app_builder_with_serve_autoscaling(monkeypatch):
    from cai_ray import config
    from cai_ray.serve.config import ServeConfig

    doc = load(KUBE / "rayservice.yaml")
    assert doc["kind"] == "RayService"
    cluster_spec_checks(doc["spec"]["rayClusterConfig"], "rayservice")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    [app] = serve_cfg["applications"]
    module, _, fn = app["import_path"].partition(":")
    assert (module, fn) == ("cai_ray.serve.deployment", "build")
    cfg = config.load_config(ServeConfig, ROOT / app["args"]["config"])
    assert cfg.scaling.min_replicas < cfg.scaling.max_replicas and cfg.scaling.gpus_per_replica >= 1
    assert cfg.auth and cfg.policy.backend == "vllm"
    head = containers(doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])[0]
    assert env_of(head)["CAI_RAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "cai-ray-auth"


def test_the_app_builder_builds_the_serve_app(monkeypatch):
    from ray.serve import Application

    from cai_ray.serve.deployment import build

    monkeypatch.setenv("CAI_RAY_API_KEY", "k" * 24)
    app = build({"config": str(ROOT / "jobs" / "configs" / "serve_tiny.yaml"), "overrides": ["scaling.max_replicas=3"]})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match=r"unknown application args \['port'\]"):
        build({"config": str(ROOT / "jobs" / "configs" / "serve_tiny.yaml"), "port": 1})
    monkeypatch.delenv("CAI_RAY_API_KEY")
    with pytest.raises(ValueError, match="no API key"):
        build({"config": str(ROOT / "jobs" / "configs" / "serve_tiny.yaml")})


def test_the_network_policy_admits_only_the_clusters_own_pods_and_the_operator():
    doc = load(KUBE / "networkpolicy.yaml")
    spec = doc["spec"]
    assert doc["kind"] == "NetworkPolicy" and spec["podSelector"]["matchLabels"] == PART_OF
    assert spec["policyTypes"] == ["Ingress"]
    own, operator = spec["ingress"]
    assert own["from"] == [{"podSelector": {"matchLabels": PART_OF}}] and "ports" not in own
    [source] = operator["from"]
    assert set(source) == {"namespaceSelector"}  # no ipBlock: nothing from outside the cluster
    assert {p["port"] for p in operator["ports"]} == {8265, 8000}


def test_nothing_is_exposed_publicly():
    for path in sorted((ROOT / "cluster").rglob("*.yaml")):
        text = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())  # not the comments
        assert "LoadBalancer" not in text and "kind: Ingress" not in text and "NodePort" not in text, path
        assert "CidrIp: 0.0.0.0/0" not in text, path


def test_the_cloud_launcher_has_token_auth_and_a_loopback_dashboard():
    doc = load(ROOT / "cluster" / "launcher" / "aws.yaml")
    assert doc["provider"]["type"] == "aws"
    assert "-e RAY_AUTH_MODE=token" in doc["docker"]["run_options"]
    assert_pinned(doc["docker"]["image"])
    assert doc["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    head = " ".join(doc["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in " ".join(doc["worker_start_ray_commands"])
    ranges = [r["CidrIp"] for p in doc["provider"]["security_group"]["IpPermissions"] for r in p["IpRanges"]]
    assert ranges and "0.0.0.0/0" not in ranges
    assert {p["FromPort"] for p in doc["provider"]["security_group"]["IpPermissions"]} == {22}
    gpu = doc["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] < gpu["max_workers"] <= doc["max_workers"]


ENTRYPOINTS = {
    "generate": ["generate"],
    "label": ["label"],
    "train": ["sft", "rm", "dpo", "ppo"],
    "serve": ["serve"],
    "eval": ["eval"],
    "pipeline": ["pipeline"],
}
TINY = {"pipeline": "demo.yaml"}  # the pipeline's small config is the one `make demo` runs


@pytest.mark.parametrize("script", sorted(ENTRYPOINTS))
def test_every_job_script_opens_with_its_ray_job_submit_command(script):
    """The docstring's first line is the exact command; its config exists and loads, and its
    paths are ones a submitted job can use (outputs absolute via $PWD)."""
    import ast

    doc = ast.get_docstring(ast.parse((ROOT / "jobs" / f"{script}.py").read_text()))
    first = doc.splitlines()[0]
    assert first.startswith("ray job submit --working-dir . -- python jobs/"), first
    argv = shlex.split(first.split(" -- ", 1)[1])
    assert argv[1] == f"jobs/{script}.py" and (ROOT / argv[1]).is_file()
    cfg_path = argv[argv.index("--config") + 1]
    assert (ROOT / cfg_path).is_file() and cfg_path.endswith(TINY.get(script, "_tiny.yaml"))
    for stage in ENTRYPOINTS[script]:  # every stage: a tiny and a gpu variant
        for name in (TINY.get(stage, f"{stage}_tiny.yaml"), f"{stage}_gpu.yaml"):
            assert (ROOT / "jobs" / "configs" / name).is_file(), name
    overrides = [a for a in argv[argv.index("--config") + 2 :] if "=" in a]
    for o in overrides:
        key, value = o.split("=", 1)
        if key in ("output", "data"):
            assert value.startswith("$PWD/") or value.startswith("$HOME/"), o


def test_a_submitted_job_refuses_relative_outputs_and_missing_relative_inputs(monkeypatch, tmp_path):
    """In a job, the working dir is Ray's temporary copy: out/sl there would be lost."""
    import json

    from cai_ray.config import ConfigError, load_config, submitted_job
    from cai_ray.generate.config import GenerateConfig
    from cai_ray.train.config import SFTTrainConfig

    assert submitted_job() is None
    load_config(GenerateConfig, None, ["input=x.jsonl", "output=out/sl"])  # fine outside a job
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR",
        json.dumps(
            {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {"job_submission_id": "raysubmit_1"}}
        ),
    )
    monkeypatch.chdir(ROOT)
    assert submitted_job() == {"submission_id": "raysubmit_1", "working_dir": "gcs://_ray_pkg_abc.zip"}
    with pytest.raises(ConfigError, match=r"output='out/sl' is relative.*output=\$PWD/out/sl"):
        load_config(GenerateConfig, ROOT / "jobs" / "configs" / "generate_tiny.yaml")
    with pytest.raises(ConfigError, match=r"data='out/sl' is not in the job's working dir"):
        load_config(SFTTrainConfig, ROOT / "jobs" / "configs" / "sft_tiny.yaml", [f"output={tmp_path}/sft"])
    with pytest.raises(ConfigError, match=r"checkpoint.storage='ckpt' is relative"):
        load_config(SFTTrainConfig, None, [f"data={tmp_path}", f"output={tmp_path}/o", "checkpoint.storage=ckpt"])
    ok = load_config(GenerateConfig, ROOT / "jobs" / "configs" / "generate_tiny.yaml", [f"output={tmp_path}/sl"])
    assert ok.input == "jobs/data/red_team_tiny.jsonl"  # inputs inside the uploaded working dir are fine
    load_config(GenerateConfig, None, ["input=s3://bucket/prompts/", "output=s3://bucket/out/"])
