"""Why a job's pod is not starting: a policy over the raw pod JSON, applied by the reconciler.

A pod that will not start without help (an image that cannot be pulled, a missing Secret key, no
node that fits it) looks like any other Pending pod to a reader of its phase. `diagnose_pod` reads
what the kubelet and the scheduler wrote instead: container waiting reasons and the PodScheduled
condition. `refused` turns a create the API server refused (admission: Pod Security, a
ResourceQuota; an invalid object) into the same shape, with the API server's own message.

Only states that do not clear on their own count. ContainerCreating and PodInitializing are
normal progress; a pod waiting at a scheduling gate is queued (Kueue), not stuck.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

# Container waiting reasons (kubelet's pkg/kubelet/images and kuberuntime) that need someone to act.
STUCK_WAITING_REASONS = frozenset(
    {
        "ErrImageNeverPull",  # imagePullPolicy Never and the image is not on the node
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "ImageInspectError",
        "RegistryUnavailable",
        "CreateContainerConfigError",  # e.g. a missing Secret or ConfigMap key
        "CreateContainerError",
        "RunContainerError",
        "PreStartHookError",
        "PostStartHookError",
        "CrashLoopBackOff",  # only with restartPolicy Always; job pods use Never, kept for completeness
    }
)
# The kubelet alternates these two for one failing pull (ErrImagePull on each try, ImagePullBackOff
# between tries): one stuck state, announced once.
_SAME_AS = {"ErrImagePull": "ImagePullBackOff"}
# Codes of a create the API server refused for good until someone changes something (403:
# admission such as Pod Security or a ResourceQuota, or RBAC; 422: invalid; 400: malformed).
# Anything else (5xx, 429, a dropped connection) is transient and retried as before.
REFUSED_CODES = frozenset({400, 403, 422})
# Messages go into status and Events (kopf cuts an Event's message at 1024 characters); a
# kubelet or admission message can be longer.
MAX_MESSAGE = 480


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


@dataclass(frozen=True)
class Diagnosis:
    """One pod that does not start, and why."""

    pod: str
    reason: str  # a kubelet waiting reason, Unschedulable, or Create<API reason> for a refused create
    message: str  # the kubelet's, the scheduler's or the API server's own words
    image: str = ""  # the image of the container that is stuck, when a container is

    @property
    def key(self) -> tuple[str, str]:
        """What stays the same while the pod is stuck the same way: an Event is due when it changes."""
        return self.pod, _SAME_AS.get(self.reason, self.reason)

    def why(self) -> str:
        """The reason, the image and the message, without the pod."""
        image = f" (image {self.image})" if self.image else ""
        return f"{self.reason}{image}: {self.message}" if self.message else f"{self.reason}{image}"

    def describe(self) -> str:
        return f"{self.pod}: {self.why()}"

    def as_status(self) -> dict[str, str]:
        """status.stuck (StuckPod in kubeforge.spec)."""
        value = asdict(self)
        if not self.image:
            del value["image"]
        return value

    @classmethod
    def from_status(cls, value: dict[str, Any] | None) -> Diagnosis | None:
        if not value or not value.get("pod"):
            return None
        return cls(value["pod"], value.get("reason", ""), value.get("message", ""), value.get("image") or "")


def event_due(previous: dict[str, Any] | None, current: Diagnosis) -> bool:
    """Whether `current` is news against status.stuck as the last pass left it (no Event storm)."""
    before = Diagnosis.from_status(previous)
    return before is None or before.key != current.key


def diagnose_pod(pod: dict[str, Any]) -> Diagnosis | None:
    """Why this pod (the API server's camelCase JSON) is stuck; None when it is not."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    name = meta.get("name", "?")
    if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
        return None  # going, or ended: the failure policy handles ended pods
    # Init containers first: the main containers wait on them.
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING_REASONS:
            image = cs.get("image") or next(
                (c.get("image", "") for c in spec.get("containers") or [] if c.get("name") == cs.get("name")), ""
            )
            return Diagnosis(name, waiting["reason"], _clip(waiting.get("message") or ""), image)
    if spec.get("schedulingGates"):
        return None  # queued, not stuck
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return Diagnosis(name, "Unschedulable", _clip(c.get("message") or "no node fits the pod"))
    return None


def diagnose(pods: Iterable[dict[str, Any]]) -> Diagnosis | None:
    """The first stuck pod among `pods`, in the order given (the reconciler passes start order)."""
    return next((d for d in map(diagnose_pod, pods) if d is not None), None)


def refused(kind: str, name: str, error: ApiException) -> Diagnosis | None:
    """A create the API server refused for good, with its own message; None if `error` is transient."""
    if error.status not in REFUSED_CODES:
        return None
    message, reason = "", ""
    try:
        body = json.loads(error.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict):  # a metav1.Status
        message, reason = str(body.get("message") or ""), str(body.get("reason") or "")
    reason = reason or (error.reason or "").title().replace(" ", "") or "Refused"
    what = name if kind == "Pod" else f"{kind} {name}"
    return Diagnosis(
        what,
        f"Create{reason}",
        _clip(f"refused by the API server ({error.status}): {message or error.body or error.reason or ''}"),
    )
