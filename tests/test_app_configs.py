"""The apps' cluster manifests: each parses with kubeforge.spec, `kubeforge validate` passes it, the
CRD's schema (what `kubectl apply` checks) accepts it, and the operator renders it into pods with the
GPU counts its comment states. The tiny variants run end to end in tests/test_sft.py and test_grpo.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubeforge import contract
from kubeforge.crd import crd_manifest
from kubeforge.validation import load_file
from kubeforge_operator import resources

REPO = Path(__file__).resolve().parents[1]

# manifest -> GPUs per pod, by instance name (pods not listed hold none)
CLUSTER_CONFIGS = {
    "apps/grpo/qwen3_1_7b.yaml": {"trainer-0": 1, "generator-0": 1, "reference-0": 1, "reward-0": 0, "controller-0": 0},
    "apps/sft/llama3_8b.yaml": {"trainer-0": 8, "controller-0": 0},
}


def rendered_pods(path: str) -> dict[str, dict]:
    job = load_file(REPO / path)
    ref = resources.JobRef(job.name, "team", "uid-1")
    return {inst.name: resources.pod(ref, job.spec, inst) for inst in contract.instances(job.spec)}


def gpus(pod: dict) -> int:
    limits = pod["spec"]["containers"][0]["resources"].get("limits", {})
    return int(limits.get(resources.GPU_RESOURCE, 0))


@pytest.mark.parametrize("path", [*CLUSTER_CONFIGS, "apps/sft/tiny.yaml", "apps/grpo/tiny.yaml"])
def test_the_manifest_validates_and_the_crd_schema_accepts_it(path):
    result = subprocess.run(
        [sys.executable, "-m", "kubeforge.cli", "validate", path], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator(schema).validate(yaml.safe_load((REPO / path).read_text()))


@pytest.mark.parametrize("path, expected", CLUSTER_CONFIGS.items())
def test_the_operator_renders_pods_with_the_stated_gpus(path, expected):
    pods = rendered_pods(path)
    assert {name: gpus(pod) for name, pod in pods.items()} == expected
    job = load_file(REPO / path)
    mounts = {v.mount_path for v in job.spec.volumes}
    # The model lives on PVCs every pod mounts: nothing is downloaded. The checkpoints go to the job's own
    # claim (spec.checkpoint.storage), which the trainer and the controller mount: nothing lost with a pod.
    assert any(job.spec.model.path.startswith(m + "/") for m in mounts)
    assert not job.spec.checkpoint.dir.startswith("/") and not job.spec.checkpoint.storage.empty_dir
    for name, pod in pods.items():
        claims = {
            v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v
        }
        run_claim = {f"{job.name}-checkpoints-uid-1"} if name.split("-")[0] in resources.STORAGE_ROLES else set()
        assert claims == {v.claim_name for v in job.spec.volumes} | run_claim, name


def test_the_grpo_trainer_runs_one_rank_and_the_sft_trainer_eight():
    grpo = {
        e["name"]: e.get("value")
        for e in rendered_pods("apps/grpo/qwen3_1_7b.yaml")["trainer-0"]["spec"]["containers"][0]["env"]
    }
    sft = {
        e["name"]: e.get("value")
        for e in rendered_pods("apps/sft/llama3_8b.yaml")["trainer-0"]["spec"]["containers"][0]["env"]
    }
    assert (grpo["PET_NNODES"], grpo["PET_NPROC_PER_NODE"]) == ("1", "1")
    assert (sft["PET_NNODES"], sft["PET_NPROC_PER_NODE"]) == ("1", "8")
    assert "KUBEFORGE_GENERATOR_URLS" in grpo and "KUBEFORGE_REFERENCE_URLS" in grpo
    assert "KUBEFORGE_GENERATOR_URLS" not in sft and "KUBEFORGE_REWARD_URLS" not in sft  # SFT: trainer + controller


def test_the_sft_settings_parse():
    for path in ("apps/sft/llama3_8b.yaml", "apps/sft/tiny.yaml"):
        cfg = load_file(REPO / path).spec.algorithm
        assert cfg.max_length >= 128 and cfg.rows_per_step >= 1
