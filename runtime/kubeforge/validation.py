"""Reading RLJob files and objects, with one kind of error message everywhere.

Every reader (the CLI, the local launcher, the operator) goes through here, so a bad spec
gets the same message whoever reads it: the field path, the value, and what was expected.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubeforge.spec import (
    ABSOLUTE_PATH,
    DNS_1035_LABEL,
    DNS_1123_SUBDOMAIN,
    MODULE_PATH,
    QUANTITY,
    RLJob,
    RLJobSpec,
)

# What a regular expression in the schema means, in words a user can act on.
PATTERN_MEANINGS = {
    DNS_1035_LABEL: "lowercase letters, digits and '-', starting with a letter and ending with a letter or digit",
    QUANTITY: "a Kubernetes quantity such as 4, 500m or 16Gi",
    MODULE_PATH: "a dotted Python module name such as apps.grpo.main",
    ABSOLUTE_PATH: "an absolute path, starting with /",
    DNS_1123_SUBDOMAIN: "a Kubernetes object name: lowercase letters, digits, '-' and '.'",
}


class SpecError(ValueError):
    """A spec that cannot be used. `problems` holds one line per bad field."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: invalid RLJob ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")


def load_file(path: str | Path) -> RLJob:
    """Parse an RLJob YAML (or JSON) file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(str(path), [f"cannot read the file: {e.strerror}"]) from None
    return load_text(text, source=str(path))


def load_text(text: str, source: str = "<input>") -> RLJob:
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SpecError(source, [f"not valid YAML: {e}"]) from None
    if len(documents) != 1:
        raise SpecError(source, [f"expected exactly one YAML document (an RLJob), found {len(documents)}"])
    return parse_job(documents[0], source=source)


def parse_job(obj: Any, source: str = "<input>") -> RLJob:
    """Validate a whole RLJob object (apiVersion, kind, metadata, spec)."""
    if not isinstance(obj, dict):
        raise SpecError(source, [f"expected a mapping with apiVersion, kind, metadata and spec, got {_show(obj)}"])
    return _validate(RLJob, obj, source, prefix=())


def parse_spec(spec: Any, source: str = "<input>") -> RLJobSpec:
    """Validate only `spec`, as the operator does with a custom resource the API server accepted:
    the schema, and what only matters on Kubernetes (`kubernetes_problems`)."""
    parsed = _validate(RLJobSpec, spec, source, prefix=("spec",))
    check_for_kubernetes(parsed, source)
    return parsed


def check_for_kubernetes(spec: RLJobSpec, source: str = "<input>") -> None:
    """Raise SpecError if the job would lose its checkpoints as pods; `kubeforge validate` and the
    operator call it, `kubeforge run` does not (locally the run directory is on this machine's disk)."""
    problems = kubernetes_problems(spec)
    if problems:
        raise SpecError(source, problems)


def kubernetes_problems(spec: RLJobSpec) -> list[str]:
    """Where a job's checkpoints would not outlive its pods on Kubernetes, one line per problem.

    In pods the run directory of the trainer and the controller is `spec.checkpoint.storage` (a
    claim), or each pod's own emptyDir with `emptyDir: true`; a relative checkpoint.dir lands in
    it, an absolute one must be inside a writable `spec.volumes` mount (the rest of the container's
    filesystem is read-only and dies with the pod).
    """
    checkpoint, problems = spec.checkpoint, []
    storage = checkpoint.storage
    restarting = sorted({r.role for r in spec.failure_policy.rules if r.action == "RestartFromCheckpoint"})
    nodes = spec.roles.trainer.nodes
    if checkpoint.dir.startswith("/"):
        mount = next(
            (
                v
                for v in spec.volumes
                if checkpoint.dir == v.mount_path or checkpoint.dir.startswith(f"{v.mount_path.rstrip('/')}/")
            ),
            None,
        )
        if mount is None:
            problems.append(
                f"spec.checkpoint.dir: got {checkpoint.dir!r}; on Kubernetes an absolute checkpoint directory "
                "must be inside the mountPath of a writable spec.volumes entry (anywhere else it is the "
                "container's own read-only filesystem, lost with the pod): make it relative to keep it on "
                "spec.checkpoint.storage, or add the volume"
            )
        elif mount.read_only:
            problems.append(
                f"spec.checkpoint.dir: got {checkpoint.dir!r}; it is inside volume {mount.name!r}, which is "
                "mounted readOnly: set readOnly: false on that volume or choose another directory"
            )
    elif storage.empty_dir and restarting:
        problems.append(
            f"spec.checkpoint.storage.emptyDir: got True; spec.failurePolicy restarts {', '.join(restarting)} from "
            "a checkpoint (RestartFromCheckpoint, also the default rules), but an emptyDir is lost with its pod, so "
            "a restarted trainer would begin again at step 0: remove emptyDir (the operator then creates a claim "
            "for the job), set claimName to an existing claim, or give those roles failure rules with action FailJob"
        )
    if nodes > 1 and storage.empty_dir and not checkpoint.dir.startswith("/"):
        problems.append(
            f"spec.checkpoint.storage.emptyDir: got True; trainer.nodes is {nodes}, and every trainer pod writes "
            "its DCP shards into one checkpoint, which must land in one shared place: remove emptyDir and set "
            "accessMode: ReadWriteMany, or put checkpoint.dir inside a shared spec.volumes claim"
        )
    if nodes > 1 and not storage.empty_dir and storage.access_mode == "ReadWriteOnce":
        problems.append(
            f"spec.checkpoint.storage.accessMode: got 'ReadWriteOnce'; trainer.nodes is {nodes} and every trainer "
            "pod mounts the run directory's claim, which ReadWriteOnce cannot share across nodes: set accessMode: "
            "ReadWriteMany with a storageClassName that offers it (NFS, CephFS, EFS, Filestore), or claimName of a "
            "ReadWriteMany claim"
        )
    return problems


def _validate(model: type[BaseModel], obj: Any, source: str, prefix: tuple[str, ...]) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise SpecError(source, [describe(error, model, prefix) for error in e.errors()]) from None


def describe(error: dict[str, Any], model: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    """One line for one pydantic error: `field.path: got VALUE; expected ...`."""
    loc = prefix + tuple(str(part) for part in error["loc"])
    where = _dotted(loc) or "(top level)"
    kind = error["type"]
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "extra_forbidden":
        known = _known_fields(model, error["loc"][:-1])
        guess = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        return f"{where}: unknown field; {hint}expected one of: {', '.join(known)}"
    message = error["msg"]
    pattern = (error.get("ctx") or {}).get("pattern")
    if kind == "string_pattern_mismatch" and pattern in PATTERN_MEANINGS:
        message = f"expected {PATTERN_MEANINGS[pattern]}"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    elif message.startswith("Input should be"):
        message = "expected " + message[len("Input should be ") :].replace("greater", "a value greater").replace(
            "less", "a value less"
        )
    elif message.startswith("String should"):
        message = "expected a string that should" + message[len("String should") :]
    return f"{where}: got {_show(error['input'])}; {message}"


def _dotted(loc: tuple[str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names (aliases) allowed at `loc`, found by walking the models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            if isinstance(part, int):
                continue
            return []
        field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside `X`, `X | None` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
