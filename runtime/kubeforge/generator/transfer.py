"""kubeforge's weight-transfer backend for vLLM, running inside vLLM's worker processes.

vLLM 0.32's RL weight-transfer API (vllm.distributed.weight_transfer) ships NCCL and CUDA-IPC
backends, none for CPU. This module registers one more, "kubeforge", that speaks the protocol
of `kubeforge.weight_sync` over gloo (CPU) or NCCL (GPU) with the same code. vLLM drives it:
`init_weight_transfer_engine` joins the group, `start_weight_update` arms vLLM's layer-wise
reload, `update_weights` receives the buckets into the model through its `load_weights`, and
`finish_weight_update` lets vLLM re-run its per-layer post-processing (the CPU backend
repacks linear weights there, which is why a plain `load_weights` after start-up fails).

vLLM builds the worker's engine in its own process, so the registration must happen there:
naming `KubeforgeWorkerExtension` as vLLM's `worker_extension_cls` imports this module in every
worker before the model is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.weight_transfer import WeightTransferEngine, WeightTransferEngineFactory
from vllm.distributed.weight_transfer.base import WeightTransferInitInfo, WeightTransferUpdateInfo

from kubeforge import weight_sync

log = logging.getLogger("kubeforge.generator.transfer")

BACKEND = "kubeforge"
# HF names of a tied LM head and the embedding it shares (Llama, Qwen, Mistral and kin).
LM_HEAD = "lm_head.weight"
EMBEDDING_SUFFIX = "embed_tokens.weight"


@dataclass(kw_only=True)
class KubeforgeInitInfo(WeightTransferInitInfo):
    """Body of POST /weights/init, as the worker receives it."""

    master_address: str
    master_port: int
    world_size: int
    rank_offset: int
    backend: str  # gloo | nccl
    group: str
    timeout_s: float = weight_sync.DEFAULT_TIMEOUT_S


@dataclass(kw_only=True)
class KubeforgeUpdateInfo(WeightTransferUpdateInfo):
    """Body of POST /weights/update, as the worker receives it."""

    version: int
    params: list[list[Any]]  # [name, dtype, shape] in the order the trainer sends them
    bucket_bytes: int
    update_id: str | None = None
    parsed: list[weight_sync.ParamSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.parsed = [weight_sync.ParamSpec.parse(p) for p in self.params]


class KubeforgeWeightTransferEngine(WeightTransferEngine[KubeforgeInitInfo, KubeforgeUpdateInfo]):
    """Worker side of `kubeforge.weight_sync`: one rank of the trainer-to-generator group."""

    init_info_cls = KubeforgeInitInfo
    update_info_cls = KubeforgeUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.receiver: weight_sync.WeightReceiver | None = None
        self.received_bytes = 0

    def init_transfer_engine(self, init_info: KubeforgeInitInfo) -> None:
        self.shutdown()  # a new formation replaces the old one (a generator joined or came back)
        rank = init_info.rank_offset + self._worker_index()
        store = weight_sync.open_store(
            f"{init_info.master_address}:{init_info.master_port}", is_master=False, timeout_s=init_info.timeout_s
        )
        group = weight_sync.join_group(
            store,
            group=init_info.group,
            rank=rank,
            world_size=init_info.world_size,
            backend=init_info.backend,
            device=self.device,
            timeout_s=init_info.timeout_s,
        )
        self.receiver = weight_sync.WeightReceiver(group)
        log.info("joined weight-sync group %s as rank %d of %d", init_info.group, rank, init_info.world_size)

    def _worker_index(self) -> int:
        # This worker's place among all of the engine's workers (TP x PP, across DP replicas),
        # numbered the way vLLM's own NCCL backend numbers them.
        parallel = self.parallel_config
        return parallel.data_parallel_index * parallel.world_size + parallel.rank

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class calls torch.accelerator.synchronize(), which raises on a CPU-only host.
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: KubeforgeUpdateInfo) -> None:
        if self.receiver is None:
            raise RuntimeError("weight update before /weights/init: this generator is not in a weight-sync group")
        self.received_bytes = self.receiver.receive(
            update_info.parsed,
            update_info.bucket_bytes,
            self._loader([p.name for p in update_info.parsed]),
            update_id=update_info.update_id,
        )

    def _loader(self, names: list[str]) -> Callable[[list[tuple[str, torch.Tensor]]], object]:
        """The model's load_weights, also feeding a tied LM head from the embedding when it is not sent.

        With tied embeddings the LM head is its own vLLM layer, and backends that post-process
        it (the CPU one repacks it) keep serving its old weights unless it is loaded too. A
        trainer may leave the tied copy out (it is the same tensor); the receiver adds it back
        here, with no extra bytes on the wire.
        """
        load = self.model.load_weights
        tied = getattr(self.model_config.hf_config.get_text_config(), "tie_word_embeddings", False)
        if not tied or LM_HEAD in names:
            return load

        def load_with_lm_head(batch: list[tuple[str, torch.Tensor]]) -> object:
            head = [(LM_HEAD, t) for name, t in batch if name.endswith(EMBEDDING_SUFFIX)]
            return load(batch + head)

        return load_with_lm_head

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.group.close()
            self.receiver = None


class KubeforgeWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); importing it registers the backend.

    Its methods are reachable with `collective_rpc`; they exist for checks and tests.
    """

    def kubeforge_weight_checksum(self) -> float:
        """Sum of every parameter of the served model, in float64: cheap evidence that weights changed."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        with torch.no_grad():
            return float(sum(p.detach().double().sum() for p in model.parameters()))


def register() -> None:
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, KubeforgeWeightTransferEngine)
    except ValueError:
        pass  # already registered in this process


register()
