"""Progress pushed by each job's controller: POST /progress/{namespace}/{name} -> status.progress.

Roles never talk to the API server; the controller sends its progress (step, policy version,
reward, weight-sync seconds) here, authenticated with the job's own token (the Secret the
operator created), and the operator writes it into the RLJob's status.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
from datetime import UTC, datetime

from aiohttp import web
from kubeforge.spec import API_GROUP, API_VERSION, PLURAL, Progress
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubeforge_operator.resources import TOKEN_KEY, JobRef

log = logging.getLogger("kubeforge_operator.progress")


class ProgressReceiver:
    def __init__(self, core: client.CoreV1Api, custom: client.CustomObjectsApi):
        self.core = core
        self.custom = custom
        self._tokens: dict[tuple[str, str], str] = {}

    def _token(self, namespace: str, name: str) -> str | None:
        key = (namespace, name)
        if key not in self._tokens:
            try:
                secret = self.core.read_namespaced_secret(JobRef(name, namespace, "").secret_name, namespace)
            except ApiException as e:
                if e.status == 404:
                    return None
                raise
            self._tokens[key] = base64.b64decode(secret.data[TOKEN_KEY]).decode()
        return self._tokens[key]

    def _patch(self, namespace: str, name: str, progress: Progress) -> None:
        body = progress.model_dump(by_alias=True, exclude_none=True)
        body["updatedAt"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.custom.patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": {"progress": body}}
        )

    async def handle(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        expected = await asyncio.to_thread(self._token, namespace, name)
        if expected is None or not hmac.compare_digest(given, expected):
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
