"""Progress pushed by each job's controller: POST /progress/{namespace}/{name} -> status.progress.

Roles never talk to the API server; the controller sends its progress (step, policy version,
reward, weight-sync seconds) here, authenticated with its own token, and the operator writes it
into the RLJob's status.

The expected token is derived from the job's uid with the operator's signing key
(kubeforge_operator.signing): no Secret is read, so the operator needs no permission to read one. A
token is good for one RLJob, not for a name. The reconcile daemons tell the receiver which uid each
job has now (`track`, and `forget` once it is gone); a job they have not told it about is read from
the API server. A job deleted and re-created under the same name gets its new token accepted at
once, and the old one refused.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from datetime import UTC, datetime

from aiohttp import web
from kubeforge import auth
from kubeforge.spec import API_GROUP, API_VERSION, PLURAL, Progress
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubeforge_operator.api import REQUEST_TIMEOUT, TRANSPORT_ERRORS
from kubeforge_operator.signing import Signer

log = logging.getLogger("kubeforge_operator.progress")


class ProgressReceiver:
    def __init__(self, custom: client.CustomObjectsApi, signer: Signer):
        self.custom = custom
        self.signer = signer
        # (namespace, name) -> the uid of the RLJob of that name now, as its reconcile daemon saw it.
        self._uids: dict[tuple[str, str], str] = {}

    def track(self, namespace: str, name: str, uid: str) -> None:
        """The RLJob `namespace/name` is the one with `uid` (its reconcile daemon started)."""
        self._uids[(namespace, name)] = uid

    def forget(self, namespace: str, name: str, uid: str) -> None:
        """The RLJob with `uid` is gone: its token is no longer good."""
        key = (namespace, name)
        if self._uids.get(key) == uid:
            del self._uids[key]

    def _uid(self, namespace: str, name: str) -> str | None:
        uid = self._uids.get((namespace, name))
        if uid is not None:
            return uid
        # No daemon has said (the operator has just started, or the job is unknown): ask, uncached.
        try:
            job = self.custom.get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return job["metadata"]["uid"]

    def _token(self, namespace: str, name: str) -> str | None:
        """The controller's token of the RLJob `namespace/name` now; None if there is no such job.
        Only the controller reports progress: its own token, not the job token every pod holds."""
        uid = self._uid(namespace, name)
        return None if uid is None else self.signer.token(uid, auth.CONTROLLER)

    def _patch(self, namespace: str, name: str, progress: Progress) -> None:
        body = progress.model_dump(by_alias=True, exclude_none=True)
        body["updatedAt"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.custom.patch_namespaced_custom_object_status(
            API_GROUP,
            API_VERSION,
            namespace,
            PLURAL,
            name,
            {"status": {"progress": body}},
            _request_timeout=REQUEST_TIMEOUT,
        )

    async def handle(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            expected = await asyncio.to_thread(self._token, namespace, name)
        except (ApiException, *TRANSPORT_ERRORS) as e:
            log.warning("%s/%s: cannot check the token: %s", namespace, name, e)
            return web.json_response({"error": "cannot check the token now; retry"}, status=503)
        if expected is None or not hmac.compare_digest(given.encode(), expected.encode()):
            return web.json_response({"error": "unknown job or wrong token"}, status=401)
        try:
            progress = Progress.model_validate(await request.json())
        except (ValueError, ValidationError) as e:
            return web.json_response({"error": f"not a progress report: {e}"}, status=400)
        try:
            await asyncio.to_thread(self._patch, namespace, name, progress)
        except ApiException as e:
            return web.json_response({"error": e.reason}, status=502 if e.status != 404 else 404)
        return web.json_response({"ok": True})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/progress/{namespace}/{name}", self.handle)
        return app


async def serve(receiver: ProgressReceiver, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(receiver.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "0.0.0.0", port).start()
    log.info("receiving progress on %s:%d", host or "0.0.0.0", port)
    return runner
