"""The RLJob resource: the single source of truth for what a job is.

The operator parses `spec` with these models, the local launcher parses the whole file with
them, and crds/rljob.yaml is generated from them (kubeforge.crd). Field names are camelCase in
YAML (Kubernetes style) and snake_case in Python.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubeforge.algorithm import Algorithm
from kubeforge.schema import Model

API_GROUP = "kubeforge.dev"
API_VERSION = "v1alpha1"
KIND = "RLJob"
PLURAL = "rljobs"
SINGULAR = "rljob"
SHORT_NAMES = ["rlj"]

# Pod and Service names are "<job>-<role>-<replica>" and must stay valid DNS-1035 labels
# (63 characters); "-generator-999" takes 14 of them.
MAX_JOB_NAME_LENGTH = 40
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
LABEL_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
MODULE_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
ABSOLUTE_PATH = r"^/"

ROLES = ("controller", "trainer", "generator", "reward", "reference")


def _number_to_str(value: Any) -> Any:
    # YAML turns `cpu: 4` into an int; Kubernetes quantities accept both spellings.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_number_to_str),
    # The pattern is repeated for the JSON schema: pydantic drops it behind a BeforeValidator.
    Field(pattern=QUANTITY, json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY}),
]


def _check_env_names(env: dict[str, str]) -> dict[str, str]:
    for name in env:
        if not re.match(ENV_NAME, name):
            raise ValueError(f"environment variable name {name!r} must match {ENV_NAME}")
        if name.startswith(("KUBEFORGE_", "PET_")):
            raise ValueError(f"{name!r} is set by kubeforge itself (KUBEFORGE_* and PET_* are reserved)")
    return env


def _check_label_keys(selector: dict[str, str]) -> dict[str, str]:
    for key in selector:
        if not re.match(LABEL_NAME, key):
            raise ValueError(f"{key!r} is not a valid label key")
    return selector


EnvVars = Annotated[dict[str, str], AfterValidator(_check_env_names)]
NodeSelector = Annotated[dict[str, str], AfterValidator(_check_label_keys)]


# ---------------------------------------------------------------------------------------------
# Roles


class RoleCommon(Model):
    """What every role's pods or processes share: resources, image and placement."""

    cpu: Quantity | None = Field(None, description="CPU request and limit per pod, e.g. 4 or 500m.")
    memory: Quantity | None = Field(None, description="Memory request and limit per pod, e.g. 16Gi.")
    image: str | None = Field(None, description="Container image for this role; default: spec.image.")
    node_selector: NodeSelector = Field(
        default_factory=dict, description="Added to spec.scheduling.nodeSelector for this role's pods."
    )
    env: EnvVars = Field(default_factory=dict, description="Extra environment variables for this role.")
    read_only_root_filesystem: bool = Field(
        True,
        description="Kubernetes: run this role's container with a read-only root filesystem (writable emptyDirs "
        "for HOME, /tmp and the caches). false: for an image that writes elsewhere.",
    )


class ControllerSpec(RoleCommon):
    """The process that runs the RL loop. There is always exactly one."""

    app: str = Field(
        "apps.grpo.main",
        pattern=MODULE_PATH,
        description="Python module whose `async def main(job)` is the RL loop.",
    )


class TrainerSpec(RoleCommon):
    """torchtitan under torchrun: `nodes` pods, each running `procsPerNode` ranks."""

    nodes: int = Field(1, ge=1, le=1024, description="Trainer pods (torchrun nodes).")
    gpus_per_node: int = Field(0, ge=0, le=16, description="GPUs per trainer pod; 0 trains on CPU.")
    procs_per_node: int | None = Field(
        None, ge=1, le=64, description="Ranks per pod; default: gpusPerNode, or 1 on CPU."
    )
    tensor_parallel: int = Field(1, ge=1, le=64, description="Tensor-parallel degree inside FSDP.")

    @model_validator(mode="after")
    def _ranks(self) -> TrainerSpec:
        if self.gpus_per_node and self.procs_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"procsPerNode ({self.procs_per_node}) must equal gpusPerNode ({self.gpus_per_node}) "
                "on GPUs: one rank drives one GPU"
            )
        if self.world_size % self.tensor_parallel:
            raise ValueError(
                f"tensorParallel ({self.tensor_parallel}) must divide the number of ranks "
                f"(nodes x procsPerNode = {self.world_size})"
            )
        return self

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


class GeneratorSpec(RoleCommon):
    """vLLM engines. Each replica is one pod holding `tensorParallel` GPUs."""

    replicas: int = Field(
        1, ge=0, le=512, description="Independent vLLM engines; 0 for a job that never samples (SFT)."
    )
    gpus: int = Field(0, ge=0, le=16, description="GPUs per replica; 0 runs vLLM on CPU.")
    tensor_parallel: int = Field(1, ge=1, le=16, description="vLLM tensor_parallel_size.")
    openai_without_token: bool = Field(
        False,
        description="Serve vLLM's OpenAI routes (/v1/*) to callers without the job token. Every other route "
        "still needs it; on Kubernetes the job's NetworkPolicy still admits only the job's own pods.",
    )

    @model_validator(mode="after")
    def _gpus_match_tp(self) -> GeneratorSpec:
        if self.gpus and self.gpus != self.tensor_parallel:
            raise ValueError(
                f"gpus ({self.gpus}) must equal tensorParallel ({self.tensor_parallel}): "
                "a replica spreads one engine over its GPUs"
            )
        if not self.gpus and self.tensor_parallel > 1:
            raise ValueError(f"tensorParallel {self.tensor_parallel} needs gpus: {self.tensor_parallel}")
        return self


class RewardSpec(RoleCommon):
    """Services that score completions."""

    replicas: int = Field(
        1, ge=0, le=512, description="Reward service replicas; 0 for a job that scores nothing (SFT)."
    )
    gpus: int = Field(0, ge=0, le=16, description="GPUs per replica (model judges); 0 for CPU rewards.")


class ReferenceSpec(RoleCommon):
    """The frozen reference model for a KL penalty; off unless enabled."""

    enabled: bool = Field(False, description="Run a reference model.")
    colocate: bool = Field(False, description="Run it inside the trainer's processes instead of as its own replicas.")
    replicas: int = Field(1, ge=1, le=512, description="Reference replicas when not colocated.")
    gpus: int = Field(0, ge=0, le=16, description="GPUs per reference replica.")


class Roles(Model):
    controller: ControllerSpec = Field(default_factory=ControllerSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec)
    reward: RewardSpec = Field(default_factory=RewardSpec)
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec)


# ---------------------------------------------------------------------------------------------
# What to train on


class ModelSpec(Model):
    path: str = Field(
        ...,
        min_length=1,
        description="Directory with an HF-layout checkpoint (config.json, *.safetensors, tokenizer), "
        "as the roles see it: a local path, or a path inside spec.volumes on Kubernetes.",
    )
    tokenizer: str | None = Field(None, min_length=1, description="Tokenizer directory; default: path.")

    @field_validator("path", "tokenizer")
    @classmethod
    def _local_only(cls, value: str | None) -> str | None:
        if value is not None and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
            raise ValueError(
                f"{value!r} is a URL; kubeforge never downloads models at run time. "
                "Give a local directory or one inside a mounted volume (spec.volumes)"
            )
        return value


class DatasetSpec(Model):
    path: str | None = Field(None, description="Local file or directory (JSONL, Parquet), or a name the app knows.")
    split: str = Field("train", min_length=1, description="Split to train on.")
    eval_split: str | None = Field(None, min_length=1, description="Held-out split for evaluation.")


AccessMode = Literal["ReadWriteOnce", "ReadWriteMany"]


class CheckpointStorage(Model):
    """Where the run directory of the trainer and the controller lives on Kubernetes: checkpoints, SFT's
    HF exports, metrics.jsonl and episodes.json must outlive every pod (a restarted trainer resumes from
    them, and they are the job's product). `kubeforge run` writes to local disk and ignores this."""

    claim_name: str | None = Field(
        None,
        pattern=DNS_1123_SUBDOMAIN,
        max_length=253,
        description="An existing PersistentVolumeClaim to use instead of one the operator creates. The operator "
        "never deletes it. Set accessMode to what the claim offers.",
    )
    storage_class_name: str | None = Field(
        None,
        min_length=1,
        description="StorageClass of the claim the operator creates; default: the cluster's default StorageClass.",
    )
    size: Quantity = Field(
        "50Gi",
        description="Size of the claim the operator creates: about (parameters x 16 bytes) x (checkpoint.keep + 1), "
        "plus the HF exports.",
    )
    access_mode: AccessMode = Field(
        "ReadWriteOnce",
        description="ReadWriteOnce: one node mounts the claim, so the controller runs on trainer-0's node. "
        "ReadWriteMany (NFS, CephFS, EFS, Filestore): needed when trainer.nodes > 1, whose DCP shards all land in it.",
    )
    when_deleted: Literal["Retain", "Delete"] = Field(
        "Retain",
        description="What happens to the claim the operator created when the RLJob is deleted: Retain keeps it "
        "(checkpoints are the product of the run; delete it with `kubectl delete pvc -l kubeforge.dev/job=NAME`), "
        "Delete lets Kubernetes delete it with the RLJob.",
    )
    empty_dir: bool = Field(
        False,
        description="Keep the run directory in each pod's own emptyDir, lost with the pod: only for jobs whose "
        "failurePolicy never restarts from a checkpoint (smoke tests).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> CheckpointStorage:
        if self.empty_dir and (self.claim_name or self.storage_class_name):
            raise ValueError("emptyDir: true takes no claimName or storageClassName; choose one place for the run")
        if self.claim_name and self.storage_class_name:
            raise ValueError(
                f"claimName {self.claim_name!r} is an existing claim; storageClassName applies only to the claim "
                "the operator creates: remove one of them"
            )
        return self


class CheckpointSpec(Model):
    dir: str = Field(
        "checkpoints",
        min_length=1,
        description="Checkpoint directory. Relative: inside the run directory, which on Kubernetes is on "
        "checkpoint.storage. Absolute: on Kubernetes it must be inside a writable spec.volumes mount.",
    )
    interval: int = Field(0, ge=0, description="Save every N steps; 0 saves only at the end.")
    keep: int = Field(2, ge=1, description="Checkpoints to keep.")
    storage: CheckpointStorage = Field(
        default_factory=CheckpointStorage,
        description="Kubernetes only: the volume that holds the run directory of the trainer and the controller.",
    )


class VolumeSpec(Model):
    name: str = Field(..., pattern=DNS_1035_LABEL, max_length=63)
    claim_name: str = Field(..., min_length=1, description="PersistentVolumeClaim to mount.")
    mount_path: str = Field(..., pattern=ABSOLUTE_PATH, description="Absolute mount path in every pod.")
    read_only: bool = False
    sub_path: str | None = None


# ---------------------------------------------------------------------------------------------
# Scheduling and failure handling


class Toleration(Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.operator == "Equal" and not self.key:
            raise ValueError("a toleration with operator Equal needs a key")
        return self


GangMechanism = Literal["capacity", "coscheduling", "volcano", "kueue", "off"]


class SchedulingSpec(Model):
    gang: GangMechanism = Field(
        "capacity",
        description="How the job's pods start all together: capacity (the operator waits until the "
        "cluster has room for every pod), coscheduling (scheduler-plugins PodGroup), volcano "
        "(Volcano PodGroup), kueue (Kueue pod group; needs queue), off.",
    )
    scheduler_name: str | None = Field(None, min_length=1, description="Pod schedulerName.")
    queue: str | None = Field(None, min_length=1, description="Kueue LocalQueue or Volcano queue.")
    priority_class_name: str | None = Field(None, min_length=1)
    node_selector: NodeSelector = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)

    @model_validator(mode="after")
    def _queue_for_kueue(self) -> SchedulingSpec:
        if self.gang == "kueue" and not self.queue:
            raise ValueError("gang: kueue needs queue: the name of a Kueue LocalQueue")
        return self


FailureAction = Literal["RestartPod", "RestartFromCheckpoint", "FailJob"]


class FailureRule(Model):
    role: Literal["controller", "trainer", "generator", "reward", "reference"]
    action: FailureAction
    on_exit_codes: list[int] = Field(
        default_factory=list, description="Match only these exit codes; empty matches any failure."
    )
    on_reasons: list[str] = Field(
        default_factory=list, description="Match only these termination reasons, e.g. OOMKilled."
    )

    @model_validator(mode="after")
    def _training_state_restarts_together(self) -> FailureRule:
        if self.action == "RestartPod" and self.role in ("trainer", "controller"):
            raise ValueError(
                f"{self.role} holds training state and cannot be restarted alone; use RestartFromCheckpoint or FailJob"
            )
        return self


DEFAULT_FAILURE_RULES = [
    FailureRule(role="generator", action="RestartPod"),
    FailureRule(role="reward", action="RestartPod"),
    FailureRule(role="reference", action="RestartPod"),
    FailureRule(role="trainer", action="RestartFromCheckpoint"),
    FailureRule(role="controller", action="RestartFromCheckpoint"),
]


# A role that failed on its own error (it raised and said so in its termination message) or ran
# out of memory would fail again the same way: only a rule naming its exit code or reason restarts it.
PERMANENT_REASONS = frozenset({"OOMKilled"})


class FailurePolicy(Model):
    max_restarts: int = Field(3, ge=0, description="Restart budget for the whole job.")
    rules: list[FailureRule] = Field(
        default_factory=lambda: list(DEFAULT_FAILURE_RULES),
        description="First match wins; a role no rule matches fails the job. A role that reported its own "
        "error or was OOMKilled is matched only by rules that name its exit code or reason.",
    )

    def action_for(
        self, role: str, exit_code: int | None = None, reason: str | None = None, *, role_error: bool = False
    ) -> FailureAction:
        """What to do about a failed `role`; `role_error`: it exited reporting an error of its own."""
        permanent = role_error or reason in PERMANENT_REASONS
        for rule in self.rules:
            if rule.role != role:
                continue
            if rule.on_exit_codes and exit_code not in rule.on_exit_codes:
                continue
            if rule.on_reasons and reason not in rule.on_reasons:
                continue
            if permanent and not (rule.on_exit_codes or rule.on_reasons):
                continue
            return rule.action
        return "FailJob"


# ---------------------------------------------------------------------------------------------
# The job


class RLJobSpec(Model):
    model: ModelSpec = Field(..., description="The policy to train.")
    steps: int = Field(100, ge=1, description="Training steps.")
    mode: Literal["sync", "async"] = Field("sync", description="sync: generate, then train; async: overlap them.")
    max_staleness: int | None = Field(
        None, ge=0, description="async only: most policy versions a sample may lag the trainer (default 1)."
    )
    roles: Roles = Field(default_factory=Roles)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    algorithm: Algorithm = Field(
        default_factory=Algorithm,
        description="The loss, the optimizer, the app's loop and the rewards: every key any role reads "
        "(kubeforge.algorithm, docs/algorithms.md); an unknown key is refused.",
    )
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy)
    image: str = Field(
        "kubeforge/runtime-cpu:0.1.0-aef2ffab61ea",
        min_length=1,
        description="Default container image for every role: the CPU runtime image that `make images` builds. "
        "GPU jobs name the CUDA image (kubeforge/runtime-cuda, docs/images.md) here or per role.",
    )
    volumes: list[VolumeSpec] = Field(default_factory=list, description="PVCs mounted in every pod.")
    env: EnvVars = Field(default_factory=dict, description="Environment variables for every role.")
    suspend: bool = Field(False, description="True deletes the pods and keeps the job; false resumes it.")
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job after this long, counted from its start or its latest resume."
    )
    startup_deadline_seconds: int | None = Field(
        1200,
        ge=1,
        description="Fail the job, deleting its pods, when they are not all Ready this long after a start, "
        "a restart or a resume; null: wait forever. It also bounds how long the controller waits for its peers.",
    )
    step_deadline_seconds: int | None = Field(
        3600,
        ge=1,
        description="The longest one call of the controller to the trainer may take (a train step, a checkpoint "
        "save, a weight publish or export); past it the controller stops with an error naming this field and the "
        "job fails. null: no limit. Raise it for large models on slow storage.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the job this long after it succeeds or fails."
    )

    @model_validator(mode="after")
    def _consistent(self) -> RLJobSpec:
        if self.mode == "sync" and self.max_staleness:
            raise ValueError(f"maxStaleness: {self.max_staleness} needs mode: async (sync training is on-policy)")
        names = [v.name for v in self.volumes]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"volumes: name {name!r} is used twice")
        generator = self.roles.generator
        vllm_args = {**self.env, **generator.env}.get("GENERATOR_VLLM_ARGS", "").split()
        if not generator.gpus and any(a.split("=")[0] == "--enable-chunked-prefill" for a in vllm_args):
            # kubeforge.generator.engine.engine_argv says why: the CPU engine core dies on it.
            raise ValueError(
                "roles.generator.env.GENERATOR_VLLM_ARGS: --enable-chunked-prefill on a CPU generator (gpus: 0) "
                "kills vLLM's engine core on seeded requests; remove it (each prompt is prefilled whole) or give "
                "the generator gpus"
            )
        return self

    @property
    def staleness_bound(self) -> int:
        if self.mode == "sync":
            return 0
        return 1 if self.max_staleness is None else self.max_staleness


class ObjectMeta(Model):
    """The part of metadata kubeforge reads; Kubernetes adds the rest."""

    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)

    name: str = Field(..., pattern=DNS_1035_LABEL, max_length=MAX_JOB_NAME_LENGTH)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Status: written by the operator (and mirrored by the local launcher)

Phase = Literal["Pending", "Starting", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]


class Condition(Model):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class RoleCount(Model):
    ready: int = 0
    total: int = 0


class Progress(Model):
    step: int = 0
    policy_version: int = 0
    reward_mean: float | None = None
    held_out_reward: float | None = Field(
        None, description="Mean reward on the held-out split at the newest evaluation (the learning signal)."
    )
    held_out_step: int | None = Field(None, description="The step that evaluation followed.")
    weight_sync_seconds: float | None = None
    updated_at: str | None = None


class StuckPod(Model):
    """A pod that does not start on its own, or a create the API server refused (kubeforge_operator.stuck)."""

    pod: str = Field(..., description="The pod, or the kind and name of another object whose create was refused.")
    reason: str = Field(..., description="A container waiting reason, Unschedulable, or Create<API reason>.")
    message: str = Field(..., description="The kubelet's, the scheduler's or the API server's own words.")
    image: str | None = Field(None, description="The image of the stuck container, when a container is stuck.")


class RLJobStatus(Model):
    phase: Phase = "Pending"
    message: str = ""
    conditions: list[Condition] = Field(default_factory=list)
    roles: dict[str, RoleCount] = Field(default_factory=dict)
    restarts: int = 0
    restarts_by_role: dict[str, int] = Field(default_factory=dict)
    restarts_by_instance: dict[str, int] = Field(
        default_factory=dict, description="Restarts of each pod, e.g. generator-1: 2."
    )
    progress: Progress = Field(default_factory=Progress)
    start_time: str | None = None
    starting_since: str | None = Field(
        None, description="When the current start, restart or resume began; the startup deadline counts from it."
    )
    stuck: StuckPod | None = Field(None, description="The first pod that does not start, and why.")
    completion_time: str | None = None
    observed_generation: int | None = Field(
        None, description="The spec generation the job's pods read: its spec ConfigMap holds it (spec edits)."
    )


class RLJob(Model):
    api_version: Literal["kubeforge.dev/v1alpha1"] = Field(..., alias="apiVersion")
    kind: Literal["RLJob"]
    metadata: ObjectMeta
    spec: RLJobSpec
    status: RLJobStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name
