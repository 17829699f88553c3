"""The environment contract: how a role process learns where it is and who its peers are.

The local launcher and the operator both build a role's environment with `role_env`, so a
role behaves the same in a local process and in a pod; the role reads it back with
`RoleContext.from_env`. No role asks Kubernetes where its peers are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeforge import auth
from kubeforge.auth import Credentials
from kubeforge.spec import RLJobSpec

# Roles whose replicas each serve HTTP, in start-up order (the controller goes last: it drives the others).
SERVICE_ROLES = ("trainer", "generator", "reward", "reference", "controller")


@dataclass(frozen=True, order=True)
class Instance:
    """One process (locally) or pod (on Kubernetes) of a role. Trainer replicas are torchrun nodes."""

    role: str
    replica: int

    @property
    def name(self) -> str:
        return f"{self.role}-{self.replica}"


def instances(spec: RLJobSpec) -> list[Instance]:
    """Every process the job runs, in start-up order."""
    roles = spec.roles
    counts = {
        "trainer": roles.trainer.nodes,
        "generator": roles.generator.replicas,
        "reward": roles.reward.replicas,
        "reference": roles.reference.replicas if roles.reference.enabled and not roles.reference.colocate else 0,
        "controller": 1,
    }
    return [Instance(role, i) for role in SERVICE_ROLES for i in range(counts[role])]


def gpus_for(spec: RLJobSpec, role: str) -> int:
    """GPUs one instance of `role` holds."""
    roles = spec.roles
    return {
        "trainer": roles.trainer.gpus_per_node,
        "generator": roles.generator.gpus,
        "reward": roles.reward.gpus,
        "reference": roles.reference.gpus,
        "controller": 0,
    }[role]


@dataclass(frozen=True)
class Endpoints:
    """Where every instance can be reached, as its peers see it.

    `http` holds one base URL per instance; `trainer_master` is torchrun's static rendezvous
    (trainer node 0); `weight_sync` is the store address of the trainer-to-generator group.
    """

    http: dict[Instance, str]
    trainer_master: tuple[str, int]
    weight_sync: tuple[str, int]

    def urls(self, role: str) -> list[str]:
        return [url for inst, url in sorted(self.http.items()) if inst.role == role]


# The module each role runs; trainers run under torchrun, which reads its PET_* variables.
ROLE_MODULES = {
    "controller": "kubeforge.controller",
    "trainer": "kubeforge.trainer",
    "generator": "kubeforge.generator",
    "reward": "kubeforge.rewards",
    "reference": "kubeforge.reference",
}


def role_command(role: str, python: str = "python") -> list[str]:
    """The command line of a role's process or container."""
    if role == "trainer":
        return [python, "-m", "torch.distributed.run", "-m", ROLE_MODULES[role]]
    return [python, "-m", ROLE_MODULES[role]]


# Variable names, in one place.
JOB = "KUBEFORGE_JOB"
NAMESPACE = "KUBEFORGE_NAMESPACE"
ROLE = "KUBEFORGE_ROLE"
REPLICA = "KUBEFORGE_REPLICA"
SPEC = "KUBEFORGE_SPEC"
RUN_DIR = "KUBEFORGE_RUN_DIR"
# A directory holding the tokens this role holds and the digests it checks callers against
# (kubeforge.auth): a Secret volume on Kubernetes. Never the tokens themselves in the environment.
TOKEN_DIR = "KUBEFORGE_TOKEN_DIR"
HTTP_HOST = "KUBEFORGE_HTTP_HOST"
HTTP_PORT = "KUBEFORGE_HTTP_PORT"
WEIGHT_SYNC_ADDR = "KUBEFORGE_WEIGHT_SYNC_ADDR"
# Where a role writes its last words as JSON when it exits (exit code, error, final progress):
# the pod's terminationMessagePath on Kubernetes, a file in the run directory locally.
TERMINATION_LOG = "KUBEFORGE_TERMINATION_LOG"
# Controller only, on Kubernetes: where to POST progress (the operator writes it into status).
PROGRESS_URL = "KUBEFORGE_PROGRESS_URL"
PEER_URLS = {role: f"KUBEFORGE_{role.upper()}_URLS" for role in SERVICE_ROLES}
# On Kubernetes: a JSON file {role: [url, ...]} of every replica the spec asks for now, which the operator
# rewrites when the spec is edited (a ConfigMap volume: the kubelet swaps it in place). Roles that follow
# scaling (the controller's generator pool, the trainer's publish targets) read it through
# `RoleContext.current_peers`; without it the peers are those of the environment at start.
PEERS_FILE = "KUBEFORGE_PEERS_FILE"
# The exit code of a role that failed in a way a fresh process cures (serving.TransientFailure).
EXIT_TRANSIENT = 75  # EX_TEMPFAIL


def permanent_error(last_words: dict[str, Any]) -> bool:
    """Whether a role's last words (its termination log: {"role", "exitCode", "error"?,
    "transient"?, ...}) report an error of its own that a restart would repeat. A failure the role
    marked transient (a weight update that stopped half-way) is cured by a restart, as a killed
    process is."""
    return bool(last_words.get("error")) and not last_words.get("transient")


def role_env(
    *,
    job: str,
    namespace: str,
    spec: RLJobSpec,
    spec_path: str,
    instance: Instance,
    endpoints: Endpoints,
    http_host: str,
    http_port: int,
    run_dir: str,
    token_dir: str,
    termination_log: str,
    progress_url: str = "",
    peers_file: str = "",
) -> dict[str, str]:
    """The environment of one instance: identity, peers, and torchrun's PET_* for trainers.

    User-given variables (spec.env, then the role's env) come first so kubeforge's own win;
    the schema already refuses KUBEFORGE_* and PET_* names there.
    """
    role_spec = getattr(spec.roles, instance.role)
    env = {**spec.env, **role_spec.env}
    env.update(
        {
            JOB: job,
            NAMESPACE: namespace,
            ROLE: instance.role,
            REPLICA: str(instance.replica),
            SPEC: spec_path,
            RUN_DIR: run_dir,
            TOKEN_DIR: token_dir,
            HTTP_HOST: http_host,
            HTTP_PORT: str(http_port),
            WEIGHT_SYNC_ADDR: f"{endpoints.weight_sync[0]}:{endpoints.weight_sync[1]}",
            TERMINATION_LOG: termination_log,
        }
    )
    if instance.role == "controller" and progress_url:
        env[PROGRESS_URL] = progress_url
    if peers_file:
        env[PEERS_FILE] = peers_file
    for role, var in PEER_URLS.items():
        urls = endpoints.urls(role)
        if urls:
            env[var] = ",".join(urls)
    if instance.role == "trainer":
        trainer = spec.roles.trainer
        env.update(
            {
                "PET_NNODES": str(trainer.nodes),
                "PET_NPROC_PER_NODE": str(trainer.ranks_per_node),
                "PET_NODE_RANK": str(instance.replica),
                "PET_MASTER_ADDR": endpoints.trainer_master[0],
                "PET_MASTER_PORT": str(endpoints.trainer_master[1]),
                "PET_RDZV_BACKEND": "static",
                # Restarts are the launcher's or the operator's decision (spec.failurePolicy).
                "PET_MAX_RESTARTS": "0",
            }
        )
    return env


@dataclass
class RoleContext:
    """What a role process knows about itself, read from the environment contract."""

    job: str
    namespace: str
    role: str
    replica: int
    spec: RLJobSpec
    run_dir: Path
    credentials: Credentials
    http_host: str
    http_port: int
    weight_sync_addr: str
    termination_log: str = ""
    progress_url: str = ""
    peers: dict[str, list[str]] = field(default_factory=dict)
    peers_file: str = ""

    @property
    def name(self) -> str:
        return f"{self.role}-{self.replica}"

    @property
    def token(self) -> str:
        """The job token, which every role holds: what a role presents to its peers' data routes."""
        return self.credentials.token(auth.JOB)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RoleContext:
        env = dict(os.environ if environ is None else environ)
        missing = [v for v in (JOB, ROLE, REPLICA, SPEC, HTTP_PORT, TOKEN_DIR) if not env.get(v)]
        if missing:
            raise RuntimeError(
                f"this process is a kubeforge role but {', '.join(missing)} is not set; "
                "start it with `kubeforge run` or through the operator"
            )
        spec = RLJobSpec.model_validate(json.loads(Path(env[SPEC]).read_text()))
        return cls(
            job=env[JOB],
            namespace=env.get(NAMESPACE, "default"),
            role=env[ROLE],
            replica=int(env[REPLICA]),
            spec=spec,
            run_dir=Path(env.get(RUN_DIR, ".")),
            credentials=auth.Credentials.load(Path(env[TOKEN_DIR]), env[ROLE]),
            http_host=env.get(HTTP_HOST, "0.0.0.0"),
            http_port=int(env[HTTP_PORT]),
            weight_sync_addr=env.get(WEIGHT_SYNC_ADDR, ""),
            termination_log=env.get(TERMINATION_LOG, ""),
            progress_url=env.get(PROGRESS_URL, ""),
            peers={role: env[var].split(",") for role, var in PEER_URLS.items() if env.get(var)},
            peers_file=env.get(PEERS_FILE, ""),
        )

    def current_peers(self, role: str) -> list[str]:
        """The URLs of `role`'s replicas as the spec asks for them now: from the peers file, which follows
        spec edits (generators scaled up or down), else from the environment at start. A file that cannot
        be read (the kubelet has not written it yet) counts as absent."""
        if self.peers_file:
            try:
                current = json.loads(Path(self.peers_file).read_text())
            except (OSError, ValueError):
                current = None
            if isinstance(current, dict) and isinstance(current.get(role, []), list):
                return [str(url) for url in current.get(role, [])]
        return list(self.peers.get(role, []))
