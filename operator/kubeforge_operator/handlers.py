"""kopf wiring: one reconcile loop (an async daemon) per RLJob, poked by its pods' events.

Each pass reads the RLJob fresh from the API server (so it never acts on a status older than
its own last patch), reconciles in a worker thread (the Kubernetes client is synchronous),
then waits until one of the job's pods changes or RESYNC_SECONDS pass. Level-triggered: a
missed event costs at most one resync. The daemons are coroutines, not threads, so thousands
of jobs cost no thread each; only the short reconcile passes use a thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubeforge.spec import API_GROUP, API_VERSION, PLURAL
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubeforge_operator import metrics, progress
from kubeforge_operator.reconcile import Reconciler
from kubeforge_operator.resources import LABEL_JOB

RESYNC_SECONDS = 10.0
# Reconcile passes wait on the API server most of the time; more threads keep more requests in flight.
RECONCILE_THREADS = 16
# After a poke, wait this long for the pod events that usually follow, then reconcile once.
COALESCE_SECONDS = 0.05

# (namespace, job) -> set when something about the job's pods changed.
_pokes: dict[tuple[str, str], asyncio.Event] = {}


def _poke_for(namespace: str, name: str) -> asyncio.Event:
    return _pokes.setdefault((namespace, name), asyncio.Event())


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.INFO
    settings.persistence.finalizer = f"{API_GROUP}/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.watching.server_timeout = 300
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.ApiClient()
    core, memo.custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    memo.reconciler = Reconciler(core, client.NetworkingV1Api(api), memo.custom, memo.get("progress_url_base", ""))
    memo.executor = ThreadPoolExecutor(max_workers=RECONCILE_THREADS, thread_name_prefix="reconcile")
    host, _, port = memo.get("progress_listen", "").rpartition(":")
    if port:
        memo.progress_server = await progress.serve(progress.ProgressReceiver(core, memo.custom), host, int(port))


@kopf.on.cleanup()
async def shut_down(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("progress_server"):
        await memo.progress_server.cleanup()
    memo.executor.shutdown(wait=False, cancel_futures=True)


def _reconcile_once(memo: kopf.Memo, namespace: str, name: str, logger: logging.Logger) -> bool:
    """One pass; False once the RLJob is gone."""
    try:
        body = memo.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return False
        logger.warning("cannot read the RLJob: %s %s", e.status, e.reason)
        return True

    def event(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)

    try:
        memo.reconciler.reconcile(body, event=event)
    except ApiException as e:
        logger.warning("reconcile failed, retrying: %s %s", e.status, e.reason)
    return True


@kopf.daemon(API_GROUP, API_VERSION, PLURAL, cancellation_timeout=10.0)
async def reconcile_job(name: str, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    poke = _poke_for(namespace, name)
    try:
        while True:
            poke.clear()
            # With the caller's context: kopf.event() finds kopf's settings there.
            context = contextvars.copy_context()
            in_context = functools.partial(context.run, _reconcile_once, memo, namespace, name, logger)
            if not await asyncio.get_running_loop().run_in_executor(memo.executor, in_context):
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(poke.wait(), timeout=RESYNC_SECONDS)
                await asyncio.sleep(COALESCE_SECONDS)
    finally:
        metrics.observe_phase(namespace, name, None)
        _pokes.pop((namespace, name), None)


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def pod_changed(labels: dict[str, str], namespace: str, **_: Any) -> None:
    _poke_for(namespace, labels[LABEL_JOB]).set()
