"""kopf wiring: one reconcile loop (an async daemon) per RLJob, poked by its pods' events.

Each pass acts on the RLJob as the previous pass left it (kopf's live body when that is exactly the
version the previous pass saw or wrote, else read fresh from the API server: it never acts on a
status older than its own last patch), reconciles in a worker thread (the Kubernetes client is synchronous),
then waits until one of the job's pods changes or RESYNC_SECONDS pass. Level-triggered: a
missed event costs at most one resync. The daemons are coroutines, not threads, so thousands
of jobs cost no thread each; only the short reconcile passes use a thread pool.

The daemon does not die of the API server's trouble: an ApiException is logged and the pass retried at
the next resync; a transport error (a timeout: every call has one, kubeforge_operator.api; a refused or
dropped connection) ends the daemon with kopf's TemporaryError, and kopf starts it again after
RESYNC_SECONDS. Any other exception is retried by kopf too (`backoff`). Only when the RLJob is gone, or
the daemon is stopped, do the job's metrics, its progress token and its capacity admission go.

All of this runs only in the leader (kubeforge_operator.leader): kopf starts once this process leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubeforge.spec import API_GROUP, API_VERSION, PLURAL
from kubeforge.validation import SpecError, parse_spec
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubeforge_operator import capacity, inventory, metrics, progress
from kubeforge_operator.api import REQUEST_TIMEOUT, TRANSPORT_ERRORS
from kubeforge_operator.reconcile import Reconciler
from kubeforge_operator.resources import LABEL_JOB, JobRef

log = logging.getLogger("kubeforge_operator")

RESYNC_SECONDS = 10.0
# Reconcile passes wait on the API server most of the time; more threads keep more requests in flight.
RECONCILE_THREADS = 16
# After a poke, wait this long for the pod events that usually follow, then reconcile once.
COALESCE_SECONDS = 0.05
# How long start-up waits for the inventory's first lists; a pending job waits for them after that.
INVENTORY_SYNC_SECONDS = 60.0

# (namespace, job) -> set when something about the job's pods changed.
_pokes: dict[tuple[str, str], asyncio.Event] = {}


class _DiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base, skipped for pods.

    kopf builds the essence of every body it is sent (a deep copy, about a fifth of the operator's CPU
    while 100 jobs start) to diff it against the last handled one. Pods have only an event handler, which
    never sees a diff, and no change handler that would store a diff base: for them it is thrown away.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        if body.get("kind") == "Pod" and body.get("apiVersion") == "v1":
            return None
        return super().build(body=body, extra_fields=extra_fields)


def _poke_for(namespace: str, name: str) -> asyncio.Event:
    return _pokes.setdefault((namespace, name), asyncio.Event())


def api_client() -> client.ApiClient:
    """The API client every part of the operator shares (in a pod: its ServiceAccount; else the kubeconfig)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # A connection for every reconcile thread, the inventory's watches and the progress receiver's: the
    # default (5 per core) is fewer, and urllib3 then opens and discards a TLS connection per request over it.
    configuration.connection_pool_maxsize = RECONCILE_THREADS + 8
    return client.ApiClient(configuration)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.INFO
    settings.persistence.finalizer = f"{API_GROUP}/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = _DiffBaseStorage(prefix=API_GROUP)
    settings.watching.server_timeout = 300
    api = memo.get("api") or api_client()
    core, memo.custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    # The capacity gate reads a watch-fed cache, and starts with the admissions the RLJobs' status records
    # (a job admitted by an earlier leader keeps its GPUs): both before any reconcile daemon runs.
    memo.inventory = inventory.Inventory(core)
    memo.inventory.start()
    if not await asyncio.to_thread(memo.inventory.wait_synced, INVENTORY_SYNC_SECONDS):
        log.warning("the cluster's nodes and pods are not listed yet; jobs waiting for GPUs wait for them")
    gate = inventory.Gate(memo.inventory.snapshot)
    admitted = await asyncio.to_thread(_read_admissions, memo.custom, memo.get("namespaces") or [], gate)
    if admitted:
        log.info("jobs the capacity gate admitted earlier: %s", ", ".join(f"{ns}/{n}" for ns, n in admitted))
    memo.reconciler = Reconciler(
        core,
        client.NetworkingV1Api(api),
        memo.custom,
        memo.get("progress_url_base", ""),
        memo.get("scraper"),
        gate,
        memo.get("signer"),
    )
    memo.executor = ThreadPoolExecutor(max_workers=RECONCILE_THREADS, thread_name_prefix="reconcile")


def _read_admissions(
    custom: client.CustomObjectsApi, namespaces: list[str], gate: inventory.Gate
) -> list[tuple[str, str]]:
    """Hold the admission of every RLJob whose status says the capacity gate let it through and that has not
    ended (in `namespaces`; none: every namespace); the jobs held."""
    listed: list[dict[str, Any]] = []
    for namespace in namespaces or [None]:
        if namespace is None:
            found = custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL, _request_timeout=REQUEST_TIMEOUT)
        else:
            found = custom.list_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, _request_timeout=REQUEST_TIMEOUT
            )
        listed.extend(found.get("items") or [])
    held = []
    for body in listed:
        meta, spec = body["metadata"], body.get("spec") or {}
        if not capacity.admitted_before(spec, body.get("status") or {}):
            continue
        try:
            parsed = parse_spec(spec, source=f"{meta['namespace']}/{meta['name']}")
        except SpecError:
            continue
        gate.hold(JobRef(meta["name"], meta["namespace"], meta["uid"]), parsed)
        held.append((meta["namespace"], meta["name"]))
    return held


@kopf.on.cleanup()
async def shut_down(memo: kopf.Memo, **_: Any) -> None:
    # Passes still running go on; kubeforge_operator.__main__ waits for them before it gives up the lead.
    memo.executor.shutdown(wait=False, cancel_futures=True)
    memo.inventory.stop()


def _reconcile_once(
    memo: kopf.Memo, namespace: str, name: str, known: dict[str, Any] | None, logger: logging.Logger
) -> tuple[bool, str | None]:
    """One pass on `known`, or on the RLJob read now if None. (False, _) once the RLJob is gone; else
    (True, the resourceVersion of the newest RLJob this pass saw or wrote). A transport error is
    kopf.TemporaryError: kopf retries the daemon after RESYNC_SECONDS."""
    try:
        return _reconcile_pass(memo, namespace, name, known, logger)
    except TRANSPORT_ERRORS as e:
        raise kopf.TemporaryError(
            f"the API server did not answer ({type(e).__name__}: {e}); retrying", delay=RESYNC_SECONDS
        ) from e


def _reconcile_pass(
    memo: kopf.Memo, namespace: str, name: str, known: dict[str, Any] | None, logger: logging.Logger
) -> tuple[bool, str | None]:
    body = known
    if body is None:
        try:
            body = memo.custom.get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as e:
            if e.status == 404:
                return False, None
            logger.warning("cannot read the RLJob: %s %s", e.status, e.reason)
            return True, None

    def event(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)

    try:
        written = memo.reconciler.reconcile(body, event=event)
    except ApiException as e:
        logger.warning("reconcile failed, retrying: %s %s", e.status, e.reason)
        return True, None
    return True, written or body["metadata"].get("resourceVersion")


@kopf.daemon(API_GROUP, API_VERSION, PLURAL, cancellation_timeout=10.0, backoff=RESYNC_SECONDS)
async def reconcile_job(
    name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    poke = _poke_for(namespace, name)
    uid = body["metadata"]["uid"]
    receiver: progress.ProgressReceiver | None = memo.get("progress_receiver")
    if receiver is not None:
        receiver.track(namespace, name, uid)
    gone = False  # the RLJob is gone, or kopf stopped the daemon: not a failure that kopf retries
    # `body` is kopf's live copy, updated by the watch. A pass may act on it when it is exactly the
    # version the previous pass saw or wrote (so never older than this loop's own last status patch);
    # on the first pass it is as fresh as a read; otherwise (the watch has not caught up with the patch,
    # or someone else changed the RLJob since) the pass reads the RLJob from the API server.
    seen: str | None = None
    first = True
    try:
        while True:
            poke.clear()
            live = copy.deepcopy(dict(body))
            usable = first or (seen is not None and live["metadata"].get("resourceVersion") == seen)
            first = False
            # With the caller's context: kopf.event() finds kopf's settings there.
            context = contextvars.copy_context()
            in_context = functools.partial(
                context.run, _reconcile_once, memo, namespace, name, live if usable else None, logger
            )
            alive, seen = await asyncio.get_running_loop().run_in_executor(memo.executor, in_context)
            if not alive:
                gone = True
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(poke.wait(), timeout=RESYNC_SECONDS)
                await asyncio.sleep(COALESCE_SECONDS)
    except asyncio.CancelledError:
        gone = True
        raise
    finally:
        # Raised otherwise (kopf.TemporaryError, or a bug kopf retries): the job is still there, and the
        # next run of this daemon goes on with its metrics, its pokes and its token.
        if gone:
            metrics.observe_phase(namespace, name, None)
            _pokes.pop((namespace, name), None)
            if receiver is not None:
                receiver.forget(namespace, name, uid)
            gate = getattr(memo.get("reconciler"), "gate", None)
            if isinstance(gate, inventory.Gate):  # its GPUs are no longer held for it
                gate.release(JobRef(name, namespace, uid))


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def pod_changed(labels: dict[str, str], namespace: str, **_: Any) -> None:
    _poke_for(namespace, labels[LABEL_JOB]).set()
