"""Desired state: the Kubernetes objects an RLJob should own, computed from the resource alone.

Pure functions, no API calls: the reconciler compares what these return with what exists.
Every pod gets its environment from kubeforge.contract.role_env, the same function the local
launcher uses, with stable DNS names of per-role headless services instead of local ports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from kubeforge import auth, contract
from kubeforge.contract import Endpoints, Instance
from kubeforge.spec import API_GROUP, API_VERSION, KIND, LABEL_NAME, RLJobSpec

HTTP_PORT = 8000
TRAINER_MASTER_PORT = 29500
WEIGHT_SYNC_PORT = 29600
SPEC_DIR = "/etc/kubeforge"
RUN_DIR = "/kubeforge/run"
# HOME of every role, an emptyDir: the root filesystem is read-only, and what the roles' libraries
# write lives under HOME whatever the image's own HOME is: Hugging Face (~/.cache/huggingface),
# vLLM's compile cache and usage config (~/.cache/vllm, ~/.config/vllm), Triton's kernels
# (~/.triton), torch hub (~/.cache/torch), CUDA's JIT cache (~/.nv), matplotlib's config
# (~/.config/matplotlib; the apps draw reward.png) and numba's cache (~/.cache/numba: it cannot
# write next to its read-only sources). A role's env may point any of them elsewhere.
HOME_DIR = "/kubeforge/home"
# /tmp, an emptyDir: torch inductor's cache (/tmp/torchinductor_<user>, which vLLM compiles into
# on CPU), torchrun's log directory, vLLM's IPC sockets (VLLM_RPC_BASE_PATH) and every tempfile.
TMP_DIR = "/tmp"
TERMINATION_LOG = "/dev/termination-log"
# The runtime images' user (images/runtime-*/Dockerfile). Pod Security "restricted" needs a non-root
# user; fsGroup makes the checkpoint claim writable by it.
RUNTIME_UID = 10001
# Roles whose run directory must outlive the pod: the trainer writes DCP checkpoints (with
# app_state.json and trainer_totals.json) and HF exports (SFT's too: under checkpoint.dir), the
# controller metrics.jsonl and episodes.json. Generators, rewards and references write nothing that
# a replacement needs, so they keep an emptyDir and never tie themselves to the claim's node.
STORAGE_ROLES = ("trainer", "controller")
# The job's tokens (kubeforge.auth): one Secret key per credential, plus their digests. Each pod
# mounts only the keys its role holds, read-only, at TOKEN_DIR; nothing goes into the environment.
TOKEN_DIR = "/var/run/kubeforge/tokens"

LABEL_JOB = f"{API_GROUP}/job"
LABEL_ROLE = f"{API_GROUP}/role"
LABEL_REPLICA = f"{API_GROUP}/replica"
# Which incarnation of the pod this is; bumped on every restart so a replacement never
# collides with a pod that is still terminating.
LABEL_GENERATION = f"{API_GROUP}/restart-generation"
# Gang scheduling: how each mechanism recognises the pods of one group.
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP = "kueue.x-k8s.io/pod-group-name"
KUEUE_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"
COSCHEDULING_GROUP = "scheduling.x-k8s.io/pod-group"
VOLCANO_GROUP = "scheduling.k8s.io/group-name"
POD_GROUP_API = {
    "coscheduling": ("scheduling.x-k8s.io", "v1alpha1", "podgroups"),
    "volcano": ("scheduling.volcano.sh", "v1beta1", "podgroups"),
}
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubeforge-operator", "app.kubernetes.io/part-of": "kubeforge"}
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class JobRef:
    """What the children need to know about their RLJob: name, namespace and uid (for ownership)."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def labels(self, role: str | None = None) -> dict[str, str]:
        labels = {**MANAGED_BY, LABEL_JOB: self.name}
        if role:
            labels[LABEL_ROLE] = role
        return labels

    def metadata(self, name: str, role: str | None = None) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": self.labels(role),
            "ownerReferences": [self.owner_reference()],
        }

    @property
    def service_name(self) -> str:
        return self.name

    def pod_name(self, inst: Instance) -> str:
        return f"{self.name}-{inst.role}-{inst.replica}"

    @property
    def config_name(self) -> str:
        return f"{self.name}-spec"

    @property
    def secret_name(self) -> str:
        """The job's token Secret. The uid in its name means no Secret made before the job can be
        mistaken for its own: the operator never reads one back (kubeforge_operator.signing)."""
        return f"{self.name}-token-{self.uid[:8]}"

    @property
    def claim_name(self) -> str:
        """The claim the operator creates for the run directory. The uid keeps a re-created job of the
        same name from silently resuming from a retained claim of an earlier one."""
        return f"{self.name}-checkpoints-{self.uid[:8]}"


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the controller owner of `obj` (the API server's JSON), None if it has none."""
    owners = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((o.get("uid") for o in owners if o.get("controller")), None)


@dataclass(frozen=True)
class Scraper:
    """The Prometheus that may scrape the job pods' /metrics through each job's NetworkPolicy:
    pods with `pod_labels` in namespaces with `namespace_labels` (either empty: any)."""

    namespace_labels: dict[str, str] = field(default_factory=dict)
    pod_labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, namespace_labels: str, pod_labels: str) -> Scraper | None:
        """From the operator's flags (`k=v,k2=v2` each); None, admitting no scraper, when both are empty."""
        scraper = cls(
            _labels("--scraper-namespace-labels", namespace_labels), _labels("--scraper-pod-labels", pod_labels)
        )
        return scraper if scraper.namespace_labels or scraper.pod_labels else None

    def peer(self) -> dict[str, Any]:
        # A peer with a podSelector alone means "in the policy's own namespace"; an empty
        # namespaceSelector means every namespace.
        peer: dict[str, Any] = {
            "namespaceSelector": {"matchLabels": self.namespace_labels} if self.namespace_labels else {}
        }
        if self.pod_labels:
            peer["podSelector"] = {"matchLabels": self.pod_labels}
        return peer


LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"


def _labels(flag: str, text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not re.match(LABEL_NAME, key) or not re.match(LABEL_VALUE, value) or len(value) > 63:
            raise ValueError(f"{flag}: got {item!r}; expected KEY=VALUE label pairs separated by commas")
        labels[key] = value
    return labels


def endpoints(job: JobRef, spec: RLJobSpec) -> Endpoints:
    """Peers as stable DNS names: pod hostname + the job's headless service (publishNotReadyAddresses)."""

    def host(inst: Instance) -> str:
        return f"{job.pod_name(inst)}.{job.service_name}.{job.namespace}.svc"

    trainer0 = host(Instance("trainer", 0))
    return Endpoints(
        http={i: f"http://{host(i)}:{HTTP_PORT}" for i in contract.instances(spec)},
        trainer_master=(trainer0, TRAINER_MASTER_PORT),
        weight_sync=(trainer0, WEIGHT_SYNC_PORT),
    )


def config_map(job: JobRef, spec: RLJobSpec) -> dict[str, Any]:
    """spec.json and peers.json (kubeforge.contract.PEERS_FILE), mounted into every pod; rewritten when
    the spec is edited, so that running pods see the replicas it asks for now."""
    peers = endpoints(job, spec)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": job.metadata(job.config_name),
        "data": {
            "spec.json": spec.model_dump_json(by_alias=True, indent=2),
            "peers.json": json.dumps({role: peers.urls(role) for role in contract.SERVICE_ROLES}, indent=2),
        },
    }


def secret(job: JobRef, tokens: dict[str, str]) -> dict[str, Any]:
    """The job's tokens (derived from its uid: kubeforge_operator.signing) and their digests."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": job.metadata(job.secret_name),
        "type": "Opaque",
        "stringData": {**tokens, auth.DIGESTS_FILE: json.dumps(auth.digests(tokens))},
    }


def token_volume(job: JobRef, role: str) -> dict[str, Any]:
    """The Secret's keys `role` holds, and the digests; readable by the runtime user (fsGroup) only."""
    keys = [*auth.held_by(role), auth.DIGESTS_FILE]
    return {
        "name": "tokens",
        "secret": {
            "secretName": job.secret_name,
            "items": [{"key": key, "path": key} for key in keys],
            "defaultMode": 0o440,
        },
    }


def service(job: JobRef) -> dict[str, Any]:
    """One headless service for the job: a DNS name for every pod, published before readiness
    (torchrun's rendezvous and the weight-sync group form before anyone is ready)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": job.metadata(job.service_name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job.name},
            "ports": [
                {"name": "http", "port": HTTP_PORT},
                {"name": "rendezvous", "port": TRAINER_MASTER_PORT},
                {"name": "weight-sync", "port": WEIGHT_SYNC_PORT},
            ],
        },
    }


def network_policy(job: JobRef, scraper: Scraper | None = None) -> dict[str, Any]:
    """Only the job's own pods reach the job's pods, on any port; `scraper` reaches HTTP_PORT alone.

    No port list between the job's pods: besides HTTP_PORT, torchrun's store (TRAINER_MASTER_PORT)
    and the weight-sync store (WEIGHT_SYNC_PORT), gloo and NCCL connect every pair of ranks on
    ephemeral ports. The operator needs no rule: progress flows from the controller to the
    operator's Service, never back (the chart's networkPolicy covers the operator's own pods).
    """
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": {"matchLabels": {LABEL_JOB: job.name}}}]}]
    if scraper is not None:
        ingress.append({"from": [scraper.peer()], "ports": [{"protocol": "TCP", "port": HTTP_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": job.metadata(f"{job.name}-same-job"),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_JOB: job.name}},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def run_claim(job: JobRef, spec: RLJobSpec) -> str | None:
    """The claim that holds the run directory of the trainer and the controller; None: their own emptyDir."""
    storage = spec.checkpoint.storage
    if storage.empty_dir:
        return None
    return storage.claim_name or job.claim_name


def checkpoint_claim(job: JobRef, spec: RLJobSpec) -> dict[str, Any] | None:
    """The PersistentVolumeClaim the operator creates for the run directory; None when the job brings
    its own claim or keeps the run directory in emptyDirs."""
    storage = spec.checkpoint.storage
    if storage.empty_dir or storage.claim_name:
        return None
    metadata = job.metadata(job.claim_name)
    if storage.when_deleted == "Retain":
        # No owner: the garbage collector leaves it when the RLJob goes. The uid says which run it held.
        del metadata["ownerReferences"]
        metadata["annotations"] = {f"{API_GROUP}/job-uid": job.uid}
    body: dict[str, Any] = {
        "accessModes": [storage.access_mode],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class_name:
        body["storageClassName"] = storage.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": body}


def pod_group(job: JobRef, spec: RLJobSpec) -> dict[str, Any] | None:
    """The PodGroup a gang scheduler (scheduler-plugins coscheduling, Volcano) admits as a whole."""
    if spec.scheduling.gang not in POD_GROUP_API:
        return None
    group, version, _ = POD_GROUP_API[spec.scheduling.gang]
    body: dict[str, Any] = {"minMember": len(contract.instances(spec))}
    if spec.scheduling.gang == "volcano" and spec.scheduling.queue:
        body["queue"] = spec.scheduling.queue
    return {"apiVersion": f"{group}/{version}", "kind": "PodGroup", "metadata": job.metadata(job.name), "spec": body}


def _gang_markers(job: JobRef, spec: RLJobSpec) -> tuple[dict[str, str], dict[str, str], str | None]:
    """Labels, annotations and default schedulerName that put a pod into the job's gang."""
    gang, total = spec.scheduling.gang, str(len(contract.instances(spec)))
    if gang == "kueue":
        return {KUEUE_QUEUE: spec.scheduling.queue or "", KUEUE_GROUP: job.name}, {KUEUE_GROUP_COUNT: total}, None
    if gang == "coscheduling":
        return {COSCHEDULING_GROUP: job.name}, {}, None
    if gang == "volcano":
        return {}, {VOLCANO_GROUP: job.name}, "volcano"
    return {}, {}, None


def _quantity_resources(role_spec: Any, gpus: int) -> dict[str, Any]:
    limits: dict[str, str] = {}
    if role_spec.cpu:
        limits["cpu"] = role_spec.cpu
    if role_spec.memory:
        limits["memory"] = role_spec.memory
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    return {"requests": dict(limits), "limits": limits} if limits else {}


def pod(
    job: JobRef, spec: RLJobSpec, inst: Instance, restart_generation: int = 0, progress_url_base: str = ""
) -> dict[str, Any]:
    """The pod of one instance, carrying the environment contract."""
    role_spec = getattr(spec.roles, inst.role)
    env = contract.role_env(
        job=job.name,
        namespace=job.namespace,
        spec=spec,
        spec_path=f"{SPEC_DIR}/spec.json",
        peers_file=f"{SPEC_DIR}/peers.json",
        instance=inst,
        endpoints=endpoints(job, spec),
        http_host="0.0.0.0",
        http_port=HTTP_PORT,
        run_dir=RUN_DIR,
        token_dir=TOKEN_DIR,
        termination_log=TERMINATION_LOG,
        progress_url=f"{progress_url_base}/progress/{job.namespace}/{job.name}" if progress_url_base else "",
    )
    # HOME is the writable emptyDir unless the role's env says otherwise (HOME_DIR's comment).
    env = {"HOME": HOME_DIR, **env}
    env_list: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(env.items())]
    scheduling = spec.scheduling
    labels = {**job.labels(inst.role), LABEL_REPLICA: str(inst.replica), LABEL_GENERATION: str(restart_generation)}
    claim = run_claim(job, spec) if inst.role in STORAGE_ROLES else None
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # restarts follow spec.failurePolicy, decided by the operator
        "hostname": job.pod_name(inst),
        "subdomain": job.service_name,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # no role talks to the API server (the operator does)
        # Pod Security "restricted".
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            # Checkpoint claims hold many large files: change their group only when the root's is wrong,
            # not every file on every mount.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": inst.role,
                "image": role_spec.image or spec.image,
                "command": contract.role_command(inst.role),
                "env": env_list,
                "ports": [{"name": "http", "containerPort": HTTP_PORT}],
                "resources": _quantity_resources(role_spec, contract.gpus_for(spec, inst.role)),
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": HTTP_PORT}, "periodSeconds": 5},
                "livenessProbe": {
                    "httpGet": {"path": "/healthz", "port": HTTP_PORT},
                    "periodSeconds": 10,
                    "failureThreshold": 6,
                },
                "terminationMessagePath": TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                    "readOnlyRootFilesystem": role_spec.read_only_root_filesystem,
                },
                "volumeMounts": [
                    {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
                    {"name": "tokens", "mountPath": TOKEN_DIR, "readOnly": True},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "run", "mountPath": RUN_DIR},
                    {"name": "home", "mountPath": HOME_DIR},
                    {"name": "tmp", "mountPath": TMP_DIR},
                    *[
                        {"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only}
                        | ({"subPath": v.sub_path} if v.sub_path else {})
                        for v in spec.volumes
                    ],
                ],
            }
        ],
        "volumes": [
            {"name": "spec", "configMap": {"name": job.config_name}},
            token_volume(job, inst.role),
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL and dataloaders need a large /dev/shm
            # The trainer's and controller's run directory outlives the pod (STORAGE_ROLES).
            {"name": "run", "persistentVolumeClaim": {"claimName": claim}}
            if claim
            else {"name": "run", "emptyDir": {}},
            {"name": "home", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            *[
                {"name": v.name, "persistentVolumeClaim": {"claimName": v.claim_name, "readOnly": v.read_only}}
                for v in spec.volumes
            ],
        ],
    }
    node_selector = {**scheduling.node_selector, **role_spec.node_selector}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if scheduling.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in scheduling.tolerations]
    if scheduling.priority_class_name:
        pod_spec["priorityClassName"] = scheduling.priority_class_name
    if inst.role == "controller" and claim and spec.checkpoint.storage.access_mode == "ReadWriteOnce":
        # One node mounts a ReadWriteOnce claim: the controller joins trainer-0 there (the trainer
        # spans one pod, kubernetes_problems refuses more). Trainer pods are created first.
        trainer0 = {LABEL_JOB: job.name, LABEL_ROLE: "trainer", LABEL_REPLICA: "0"}
        pod_spec["affinity"] = {
            "podAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": trainer0}, "topologyKey": "kubernetes.io/hostname"}
                ]
            }
        }
    gang_labels, gang_annotations, gang_scheduler = _gang_markers(job, spec)
    if scheduling.scheduler_name or gang_scheduler:
        pod_spec["schedulerName"] = scheduling.scheduler_name or gang_scheduler
    metadata = job.metadata(job.pod_name(inst), inst.role)
    metadata["labels"] = {**labels, **gang_labels}
    if gang_annotations:
        metadata["annotations"] = gang_annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def gpus_needed(spec: RLJobSpec) -> list[int]:
    """GPUs of each pod the job runs (for the capacity gate)."""
    return [contract.gpus_for(spec, i.role) for i in contract.instances(spec)]
