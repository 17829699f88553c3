"""Checkpoint storage for jobs on the KWOK nodes. Every RLJob's trainer and controller mount a claim
(spec.checkpoint.storage); the testbed's default class, local-path, provisions through a helper pod
that a KWOK node only pretends to run, so those claims would never bind. This class binds a claim at
once to one of a pool of static PersistentVolumes that nothing ever mounts."""

from __future__ import annotations

import functools

from kubernetes import client
from kubernetes.client.exceptions import ApiException

CLASS = "kwok-instant"
POOL = 200  # one per job the e2e tier creates, with room to spare


def _create(call, body) -> None:  # noqa: ANN001
    try:
        call(body)
    except ApiException as e:
        if e.status != 409:
            raise


@functools.cache
def instant_storage_class() -> str:
    """Create the class and its pool once per session; its name, for spec.checkpoint.storage.storageClassName."""
    storage = client.StorageV1Api()
    _create(storage.create_storage_class, {
        "metadata": {"name": CLASS},
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "Immediate",
        "reclaimPolicy": "Retain",
    })  # fmt: skip
    core = client.CoreV1Api()
    for i in range(POOL):
        _create(core.create_persistent_volume, {
            "metadata": {"name": f"{CLASS}-{i}"},
            "spec": {
                "storageClassName": CLASS,
                "capacity": {"storage": "10Ti"},
                "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": f"/nonexistent/kubeforge-{CLASS}-{i}"},
            },
        })  # fmt: skip
    return CLASS
