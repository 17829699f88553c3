"""The generator replica: one vLLM engine behind /generate, the OpenAI API and the weight routes.

- POST /generate: token ids in (JSON), samples with per-token logprobs out (safetensors, wire.py).
- POST /v1/completions, POST /v1/chat/completions, GET /v1/models: vLLM's own OpenAI serving
  classes on the same engine.
- GET /weights/info: policy version and worker count (the ranks this replica adds to the
  weight-sync group).
- POST /weights/init: join the trainer's weight-sync group (answers once the group is formed).
- POST /weights/update: receive one full set of weights while the trainer broadcasts them,
  then bump the policy version (answers once they are loaded).

Every answer on /v1/* carries the served policy version in the X-Kubeforge-Policy-Version header.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Literal

from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from kubeforge import limits, serving
from kubeforge.generator import metrics, wire
from kubeforge.weight_sync import ParamSpec

log = logging.getLogger("kubeforge.generator")

POLICY_VERSION_HEADER = "X-Kubeforge-Policy-Version"


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_token_ids: list[list[int]] = Field(..., min_length=1)
    n: int = Field(1, ge=1)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    # Prompt i is sampled with seed + i, so that prompts of one request don't share a stream.
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False


def check_limits(request: GenerateRequest, max_model_len: int) -> None:
    """Refuse (400, naming the limit) a request over a bound of kubeforge/limits.py or the model's length."""
    prompts, n = len(request.prompt_token_ids), request.n
    if prompts > limits.MAX_PROMPTS:
        raise HTTPException(400, f"{prompts} prompts; at most {limits.MAX_PROMPTS} per request (MAX_PROMPTS)")
    if n > limits.MAX_N:
        raise HTTPException(400, f"n is {n}; at most {limits.MAX_N} samples per prompt (MAX_N)")
    if prompts * n > limits.MAX_SAMPLES:
        raise HTTPException(
            400, f"{prompts} prompts x n {n} = {prompts * n} samples; at most {limits.MAX_SAMPLES} (MAX_SAMPLES)"
        )
    if request.max_tokens > max_model_len:
        raise HTTPException(
            400, f"max_tokens is {request.max_tokens}; the model's length (max_model_len) is {max_model_len}"
        )
    if request.seed is not None and not limits.SEED_MIN <= request.seed <= limits.SEED_MAX - (prompts - 1):
        raise HTTPException(
            400,
            f"seed is {request.seed}; seed and seed + {prompts - 1} (one per prompt) must be int64 "
            f"[{limits.SEED_MIN}, {limits.SEED_MAX}] (SEED_MIN, SEED_MAX)",
        )
    stops = len(request.stop_token_ids or ())
    if stops > limits.MAX_STOP_TOKEN_IDS:
        raise HTTPException(400, f"{stops} stop_token_ids; at most {limits.MAX_STOP_TOKEN_IDS} (MAX_STOP_TOKEN_IDS)")


class WeightInitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    master_address: str
    master_port: int = Field(..., ge=1, le=65535)
    world_size: int = Field(..., ge=2)
    rank_offset: int = Field(..., ge=1)
    backend: Literal["gloo", "nccl"]
    group: str = Field(..., min_length=1)
    timeout_s: float = Field(300.0, gt=0)


class WeightUpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(..., ge=0)
    params: list[tuple[str, str, list[int]]] = Field(..., min_length=1)  # (name, dtype, shape)
    bucket_bytes: int = Field(..., ge=1)
    update_id: str | None = None
    # What happens to requests in flight while the weights are copied: "keep" freezes them and
    # resumes them on the new weights (their KV cache is recomputed), "wait" lets them finish
    # first (admission stays paused meanwhile), "abort" drops them.
    pause_mode: Literal["keep", "wait", "abort"] = "keep"


class Generator:
    """The replica's state around one AsyncLLM: policy version, in-flight count, weight updates."""

    def __init__(self, server: serving.RoleServer, engine, engine_args):
        self.server = server
        self.engine = engine
        self.engine_args = engine_args
        self.labels = serving.role_labels(server.ctx)
        self.policy_version = 0
        self.broken = ""  # set when a weight update failed half-way: the model is unusable
        self.sync_group = ""  # the weight-sync group joined, once /weights/init succeeded
        self.updating: int | None = None  # the version a weight update is loading now
        # Serve only from this policy version on (set when the trainer is already past the disk weights).
        self.serve_from_version = 0
        self._weights_lock = asyncio.Lock()
        self._inflight = 0
        metrics.POLICY_VERSION.labels(**self.labels).set(0)

    # -- generation ---------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> bytes:
        self._check_usable()
        check_limits(request, self.engine.model_config.max_model_len)
        self._check_prompts(request.prompt_token_ids)
        self._count_inflight(+1)
        try:
            # One engine request per prompt (n samples each), all in flight at once: vLLM batches them.
            requests = [
                self._generate_one(ids, self._sampling_params(request, i))
                for i, ids in enumerate(request.prompt_token_ids)
            ]
            outputs = await asyncio.gather(*requests)
        finally:
            self._count_inflight(-1)
        return self._encode(outputs)

    def _sampling_params(self, request: GenerateRequest, prompt_index: int):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(
            n=request.n,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=None if request.seed is None else request.seed + prompt_index,
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
            logprobs=0,  # the sampled token's own logprob, nothing more
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def _generate_one(self, prompt_token_ids: list[int], params):
        from vllm.inputs import TokensPrompt

        # vLLM's renderer checks the prompt against the model (length, vocabulary) as its own
        # servers do; a bad prompt is a ValueError, answered 400 by vLLM's exception handlers.
        (engine_input,) = await self.engine.renderer.render_cmpl_async(
            [TokensPrompt(prompt_token_ids=prompt_token_ids)]
        )
        final = None
        async for output in self.engine.generate(engine_input, params, f"kf-{uuid.uuid4().hex}"):
            final = output
        return final

    def _encode(self, outputs) -> bytes:
        samples, prompt_index, finish, versions = [], [], [], []
        for i, output in enumerate(outputs):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                samples.append((ids, [completion.logprobs[t][tok].logprob for t, tok in enumerate(ids)]))
                prompt_index.append(i)
                finish.append(completion.finish_reason or "abort")
                versions.append(self._versions(completion))
        return wire.encode(samples, prompt_index=prompt_index, finish_reasons=finish, policy_versions=versions)

    def _versions(self, completion) -> list[int]:
        # vLLM labels each span of a sample's tokens with the weight version that sampled them.
        spans = completion.weight_versions or []
        try:
            return [int(spans[0].version), int(spans[-1].version)] if spans else [self.policy_version] * 2
        except ValueError:  # a label we did not set
            return [self.policy_version] * 2

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        # An id outside the vocabulary would fail inside the engine core and take it down.
        vocab = self.engine.model_config.get_vocab_size()
        for i, ids in enumerate(prompts):
            if not ids:
                raise HTTPException(400, f"prompt_token_ids[{i}] is empty")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise HTTPException(400, f"prompt_token_ids[{i}] holds {bad}, outside the vocabulary [0, {vocab})")

    def _count_inflight(self, delta: int) -> None:
        self._inflight += delta
        metrics.IN_FLIGHT.labels(**self.labels).set(self._inflight)

    def _check_usable(self) -> None:
        if self.broken:
            raise HTTPException(503, f"generator unusable: {self.broken}")
        if self.policy_version < self.serve_from_version:
            raise HTTPException(503, f"waiting for policy version {self.serve_from_version} from the trainer")

    # -- weights ------------------------------------------------------------------------------

    def weights_info(self) -> dict:
        parallel = self.engine.vllm_config.parallel_config
        model = self.engine.vllm_config.model_config
        return {
            "policy_version": self.policy_version,
            "workers": parallel.world_size,  # tensor x pipeline parallel: ranks this replica adds
            "dtype": str(model.dtype).removeprefix("torch."),
            "model": model.model,
            "broken": self.broken or None,
            "updating": self.updating,
        }

    async def init_weights(self, request: WeightInitRequest) -> dict:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        async with self._weights_lock:
            start = time.perf_counter()
            await self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=request.model_dump()))
            self.sync_group = request.group
            log.info("joined weight-sync group %s (rank offset %d)", request.group, request.rank_offset)
            return {"group": request.group, "seconds": time.perf_counter() - start, **self.weights_info()}

    async def update_weights(self, request: WeightUpdateRequest) -> dict:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        update_info = request.model_dump(include={"version", "params", "bucket_bytes", "update_id"})
        nbytes = sum(ParamSpec.parse(p).nbytes for p in request.params)
        async with self._weights_lock:
            if self.broken:
                raise HTTPException(503, f"generator unusable: {self.broken}")
            if not self.sync_group:
                # Refused before pausing: once the layer-wise reload has started, only a
                # complete update leaves a usable model.
                raise HTTPException(409, "not in a weight-sync group: POST /weights/init first")
            start = time.perf_counter()
            # Admission pauses here, before the first byte, and resumes right after the copy.
            await self.engine.pause_generation(mode=request.pause_mode, clear_cache=True)
            self.updating = request.version
            try:
                await self.engine.start_weight_update()
                await self.engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))
                await self.engine.finish_weight_update(weight_version=str(request.version))
            except BaseException as e:
                # Layer-wise reload swaps layers out while they load: a half-done update leaves
                # a model that cannot run. Stay paused and say so; the role then exits
                # (role.watch: TransientFailure) and the failure policy restarts it.
                self.broken = f"weight update to v{request.version} failed: {type(e).__name__}: {e}"
                self.server.set_not_ready(self.broken)
                log.error("%s", self.broken)
                raise
            finally:
                self.updating = None
            await self.engine.resume_generation()
            seconds = time.perf_counter() - start
            self._set_version(request.version)
        metrics.WEIGHT_UPDATE_SECONDS.labels(**self.labels).observe(seconds)
        metrics.WEIGHT_UPDATE_BYTES.labels(**self.labels).inc(nbytes)
        log.info("weights v%d loaded: %.1f MB in %.3f s", request.version, nbytes / 1e6, seconds)
        return {"policy_version": self.policy_version, "seconds": seconds, "bytes": nbytes}

    def _set_version(self, version: int) -> None:
        if version < self.policy_version:
            log.warning("policy version goes back from %d to %d", self.policy_version, version)
        self.policy_version = version
        metrics.POLICY_VERSION.labels(**self.labels).set(version)
        if not self.server.ready and version >= self.serve_from_version:
            self.server.set_ready()

    def wait_for_weights(self, version: int) -> None:
        """Stay not ready until the trainer has sent policy `version` (this replica joined late or restarted)."""
        self.serve_from_version = version
        self.server.set_not_ready(
            f"waiting for policy version {version} from the trainer (POST /weights/init, /update)"
        )


def add_routes(app: FastAPI, generator: Generator) -> None:
    # Every route but the probes needs a token (kubeforge.auth): the weight routes the trainer's.

    @app.post("/generate")
    async def generate(request: GenerateRequest) -> Response:
        body = await generator.generate(request)
        return Response(body, media_type=wire.CONTENT_TYPE)

    @app.get("/weights/info")
    async def weights_info() -> dict:
        return generator.weights_info()

    @app.post("/weights/init")
    async def weights_init(body: WeightInitRequest) -> dict:
        return await generator.init_weights(body)

    @app.post("/weights/update")
    async def weights_update(body: WeightUpdateRequest) -> dict:
        return await generator.update_weights(body)


def add_policy_version_header(app: FastAPI, version: Callable[[], int]) -> None:
    """Stamp every /v1/* answer with the policy version served when it was answered.

    Starlette refuses middleware once the app has served its first request, so the role adds
    this before its first await, while the server is still starting.
    """

    @app.middleware("http")
    async def policy_version_header(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            response.headers[POLICY_VERSION_HEADER] = str(version())
        return response


async def add_openai_routes(app: FastAPI, generator: Generator) -> None:
    """Serve vLLM's own OpenAI completion, chat and models routes from the same engine."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.openai.chat_completion.api_router import attach_router as attach_chat
    from vllm.entrypoints.openai.completion.api_router import attach_router as attach_completion
    from vllm.entrypoints.openai.models.api_router import attach_router as attach_models
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler

    supported_tasks = await generator.engine.get_supported_tasks()
    await init_app_state(generator.engine, app.state, generator.engine_args, supported_tasks)
    attach_completion(app)
    attach_chat(app)
    attach_models(app)
    init_exception_handler(app)  # OpenAI-shaped error bodies, as `vllm serve` answers
