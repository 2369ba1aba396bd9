"""deploy/kuberay: the RayJob and its nightly CronJob, checked structurally against the fields KubeRay
documents for ray.io/v1 RayJob (KubeRay >= 1.3: RayJobSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec)
and Kubernetes batch/v1 CronJob; the entrypoint is parsed by the job's own argument parser."""

from __future__ import annotations

import shlex

import yaml

from tests.conftest import ROOT

KUBERAY = ROOT / "deploy" / "kuberay"
# ray.io/v1 field names, KubeRay 1.3 (the ones a RayJob may set; anything else is rejected by the CRD).
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "entrypoint", "entrypointNumCpus", "entrypointNumGpus",
    "entrypointResources", "jobId", "managedBy", "metadata", "rayClusterSpec", "clusterSelector",
    "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
    "suspend", "ttlSecondsAfterFinished", "deletionPolicy",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
CLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
HEAD_SPEC = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_SPEC = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "scaleStrategy",
               "numOfHosts", "idleTimeoutSeconds", "suspend"}


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _containers(template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def test_rayjob_has_only_kuberay_fields_and_runs_the_job_with_resume_retries() -> None:
    (job,) = _docs("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1  # retries rely on resume
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"], dict)
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= CLUSTER_SPEC and set(cluster["headGroupSpec"]) <= HEAD_SPEC
    assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())
    _containers(cluster["headGroupSpec"]["template"])
    (gpu,) = cluster["workerGroupSpecs"]
    assert set(gpu) <= WORKER_SPEC and gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    (worker,) = _containers(gpu["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"

    # The entrypoint is a valid synthesize.py command line whose actor count the GPU group can hold.
    from jobs.synthesize import build_parser, config_from_args

    argv = shlex.split(spec["entrypoint"])
    assert argv[1].endswith("jobs/synthesize.py")
    args = build_parser().parse_args(argv[2:])
    assert args.config and all(c.startswith("/app/") for c in args.config)
    assert all((ROOT / c.removeprefix("/app/")).is_file() for c in args.config)
    args.config = [str(ROOT / c.removeprefix("/app/")) for c in args.config]
    cfg = config_from_args(args)
    assert cfg.job.num_actors * cfg.job.gpus_per_actor <= gpu["maxReplicas"]
    assert args.output.startswith("s3://")  # a shared output, so a retried submission resumes it
    # The nightly pattern: a growing Parquet folder into one fixed folder (no date in the output).
    assert args.prompts.endswith("/") and not any(c.isdigit() for c in args.output.split("://", 1)[1])
    assert not args.force  # --force would redo every earlier night


def test_nightly_cronjob_creates_a_fresh_rayjob_each_night() -> None:
    docs = {d["kind"]: d for d in _docs("rayjob-nightly.yaml")}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1" and len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]
    (container,) = _containers(cron["spec"]["jobTemplate"]["spec"]["template"])
    assert "kubectl create -f -" in " ".join(container["args"]) and "generateName" in " ".join(container["args"])
    assert pod["volumes"][0]["configMap"]["name"] == "referee-synth-rayjob"
