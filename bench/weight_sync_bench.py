"""B1/B9: the trainer's weight publish into generator-layout receivers, against a raw broadcast, in one run.

Trainer side, exactly what `Trainer.publish_weights` runs: the policy built by
`kubeforge.trainer.model.build_model` from an HF-style Qwen3 config (FSDP2 over T ranks, fp32
master weights, random init), `iter_hf_weights` (FSDP2 `unshard()` of one block at a time, in
bf16, HF names), `hf_weight_names`, and `WeightSender.send` (bucket plan, the receivers' ready
handshake, packing into two preallocated buckets in turn, each broadcast while the next is packed). Trainer ranks
other than 0 run the same gathers, as the engine's other ranks do. The only part left out is
HTTP: the bench has no generator URLs, so `send` posts nothing and the receivers start on their
own (the handshake through the store still runs).

Receiver side, what the generator's vLLM worker runs (`generator/transfer.py`):
`WeightReceiver.receive` (a buffer per bucket, views of it, no copies) feeding `VllmQwen3.load_weights`,
a small stand-in for vLLM's Qwen3ForCausalLM under its layer-wise reload (vLLM cannot run on
the GPU machines; docs/benchmarks.md says what differs).

Baseline, same process group, same run: one raw NCCL broadcast of the same number of bytes.

    torchrun is not needed: this script spawns T + R processes itself (one GPU each).
    python bench/weight_sync_bench.py --models qwen3-1.7b --cases 1x1,1x3,2x2 --bucket-mb 64,256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import socket
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import _random as dtensor_random
from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from kubeforge import weight_sync  # noqa: E402
from kubeforge.trainer import model as policy  # noqa: E402
from kubeforge.weight_sync import SyncGroup, WeightReceiver, WeightSender  # noqa: E402
from weight_sync_check import raw_broadcast  # noqa: E402

# HF config.json fields of the Qwen3 checkpoints whose sizes are benchmarked (weights are random).
_QWEN3 = dict(
    model_type="qwen3",
    architectures=["Qwen3ForCausalLM"],
    head_dim=128,
    num_key_value_heads=8,
    vocab_size=151936,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000,
    torch_dtype="bfloat16",
)
QWEN3: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _QWEN3
    | dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16)
    | dict(tie_word_embeddings=True),
    "qwen3-1.7b": _QWEN3
    | dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16)
    | dict(tie_word_embeddings=True),
    "qwen3-4b": _QWEN3
    | dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32)
    | dict(tie_word_embeddings=True),
    "qwen3-8b": _QWEN3
    | dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32)
    | dict(tie_word_embeddings=False),
    # For a CPU (gloo) check of the script itself.
    "tiny": _QWEN3
    | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    | dict(num_key_value_heads=2, head_dim=32, vocab_size=128, tie_word_embeddings=True),
}

# vLLM's Qwen2/Qwen3 packed modules: HF projection -> (fused vLLM parameter, index of its part).
STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


class VllmQwen3:
    """Qwen3 weights in vLLM's Qwen3ForCausalLM layout, loaded the way vLLM's layer-wise reload loads them.

    Layout: q/k/v fused into `qkv_proj`, gate/up into `gate_up_proj`, a tied LM head sharing the
    embedding's storage. Loading (vllm.model_executor.model_loader.reload.layerwise): each
    incoming tensor is held until its vLLM layer has all of its elements, then the layer is
    materialised in fresh memory, each part copied into its rows (the weight loader), and the
    result copied into the live parameter (which CUDA graphs point at). A tied embedding is
    loaded a second time as the LM head, as `KubeforgeWeightTransferEngine._loader` feeds it.
    """

    def __init__(self, config: dict[str, Any], device: torch.device, dtype: torch.dtype):
        hidden, inner, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
        q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
        self.tied = bool(config["tie_word_embeddings"])
        self.params: dict[str, torch.Tensor] = {}
        self.parts: dict[str, list[int]] = {}  # fused parameter -> rows of each part
        shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (config["vocab_size"], hidden)}
        for i in range(config["num_hidden_layers"]):
            layer = f"model.layers.{i}."
            shapes[layer + "input_layernorm.weight"] = (hidden,)
            shapes[layer + "self_attn.qkv_proj.weight"] = (q + 2 * kv, hidden)
            self.parts[layer + "self_attn.qkv_proj.weight"] = [q, kv, kv]
            shapes[layer + "self_attn.o_proj.weight"] = (hidden, q)
            shapes[layer + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[layer + "self_attn.k_norm.weight"] = (head_dim,)
            shapes[layer + "post_attention_layernorm.weight"] = (hidden,)
            shapes[layer + "mlp.gate_up_proj.weight"] = (2 * inner, hidden)
            self.parts[layer + "mlp.gate_up_proj.weight"] = [inner, inner]
            shapes[layer + "mlp.down_proj.weight"] = (hidden, inner)
        shapes["model.norm.weight"] = (hidden,)
        if not self.tied:
            shapes[LM_HEAD] = (config["vocab_size"], hidden)
        for name, shape in shapes.items():
            self.params[name] = torch.empty(shape, dtype=dtype, device=device)
        if self.tied:
            self.params[LM_HEAD] = self.params[EMBEDDING]
        self._pending: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        self._numel: dict[str, int] = defaultdict(int)

    def unique(self) -> list[torch.Tensor]:
        return list({id(t): t for t in self.params.values()}.values())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            self._load(name, tensor)
            if self.tied and name == EMBEDDING:
                self._load(LM_HEAD, tensor)

    def _load(self, name: str, tensor: torch.Tensor) -> None:
        prefix, _, leaf = name.rpartition(".weight")[0].rpartition(".")
        target, part = (f"{prefix}.{STACKED[leaf][0]}.weight", STACKED[leaf][1]) if leaf in STACKED else (name, 0)
        self._pending[target].append((part, tensor))
        self._numel[target] += tensor.numel()
        live = self.params[target]
        if self._numel[target] < live.numel():
            return  # the layer waits for its other parts
        staging = torch.empty_like(live)
        rows = self.parts.get(target, [live.shape[0]])
        for part, value in self._pending.pop(target):
            start = sum(rows[:part])
            staging[start : start + rows[part]].copy_(value)
        live.copy_(staging)
        del self._numel[target]


# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    trainers: int
    receivers: int
    gpus: int  # distinct GPUs: fewer than trainers + receivers when a receiver shares a trainer rank's
    bucket_mib: int
    buckets: int
    gbytes: float
    total_ms: float  # best real round: from the common start until every rank finished
    total_median_ms: float
    pause_ms: float  # best real round: the slowest receiver's receive-and-load, start to end
    raw_ms: float  # best raw broadcast of the same bytes in one piece
    gather_pack_ms: float  # instrumented round, sender: before each bucket's broadcast
    wire_ms: float  # instrumented round: the broadcasts alone
    load_ms: float  # instrumented round, slowest receiver: after each broadcast
    instrumented_ms: float

    @property
    def ratio(self) -> float:
        return self.total_ms / self.raw_ms


class PhaseClock:
    """Stands in for one rank's `SyncGroup.broadcast` for one round and splits the round's time.

    Before each bucket it waits for this rank's queued work, meets the other ranks in a
    one-element broadcast, then times the bucket's broadcast alone: so a sender's time before
    the broadcasts is gather + pack, a receiver's time after them is unpack + load, and the
    broadcasts are the wire. The waits serialise what the real path overlaps, so the phases add
    up to more than a real round; the totals reported come from uninstrumented rounds.
    """

    def __init__(self, group: SyncGroup):
        self.group = group
        self.flag = torch.zeros(1, device=group.device)
        self.outside = self.wire = 0.0
        self.mark = 0.0

    def __enter__(self) -> PhaseClock:
        self.group.broadcast = self.broadcast  # type: ignore[method-assign]
        self.mark = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.group.device)
        self.outside += time.perf_counter() - self.mark
        del self.group.broadcast  # back to the class's method

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> None:
        # Synchronous even when asked for async_op (the sender then has no work to wait on): the
        # point of this round is to separate what the real rounds overlap.
        _sync(self.group.device)
        self.outside += time.perf_counter() - self.mark
        SyncGroup.broadcast(self.group, self.flag, src)
        _sync(self.group.device)
        start = time.perf_counter()
        SyncGroup.broadcast(self.group, tensor, src)
        _sync(self.group.device)
        self.mark = time.perf_counter()
        self.wire += self.mark - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _meet(group: SyncGroup) -> None:
    """All of the group's ranks leave this together (within a broadcast's latency)."""
    SyncGroup.broadcast(group, torch.zeros(1, device=group.device))
    _sync(group.device)


class Bench:
    """One process: trainer rank, receiver or idle, case by case, in the same order on every rank."""

    def __init__(self, rank: int, world: int, args: argparse.Namespace):
        self.rank, self.world, self.args = rank, world, args
        cuda = args.backend == "nccl"
        # With fewer GPUs than ranks, the last GPU takes the extra ranks: a receiver then shares the
        # GPU of the last trainer rank (never the sender's: an NCCL group needs distinct GPUs).
        self.gpus = torch.cuda.device_count() if cuda else world
        self.device = torch.device("cuda", min(rank, self.gpus - 1)) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        # gloo for the bench's own coordination; the NCCL groups are the FSDP meshes and weight sync.
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{args.ports[0]}",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=10),
        )
        # FSDP meshes over ranks 0..T-1 for every T (new_group is collective over all ranks).
        trainers = sorted({t for t, _ in args.cases})
        self.meshes = {t: dist.new_group(list(range(t)), backend=args.backend) for t in trainers}
        self.sync_addr = f"127.0.0.1:{args.ports[1]}"
        self.sender = WeightSender(self.sync_addr, backend=args.backend, device=self.device) if rank == 0 else None
        self.store: dist.Store | None = None
        self.sends = 0  # WeightSender numbers its updates; receivers name the same update ids
        self.formations = 0
        self.results: list[Result] = []

    def run(self) -> list[Result]:
        for name in self.args.models:
            config = QWEN3[name]
            dtype = policy.hf_dtype(config)
            receiver_model = None
            for trainers in sorted({t for t, _ in self.args.cases}):
                trainer_model = None
                if self.rank < trainers:
                    trainer_model = self._build_trainer(config, trainers)
                for t, receivers in self.args.cases:
                    if t != trainers:
                        continue
                    role = self._role(trainers, receivers)
                    if role == "receiver" and receiver_model is None:
                        receiver_model = VllmQwen3(config, self.device, dtype)
                    sweep = (trainers, receivers) == self.args.cases[0]  # the bucket sweep runs on the first case
                    buckets = self.args.bucket_mb if sweep else [self.args.default_bucket_mb]
                    self._case(name, trainers, receivers, buckets, role, trainer_model, receiver_model)
                del trainer_model
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            del receiver_model
        dist.barrier()
        return self.results

    def _role(self, trainers: int, receivers: int) -> str:
        if self.rank < trainers:
            return "trainer"
        return "receiver" if self.rank < trainers + receivers else "idle"

    def _build_trainer(self, config: dict[str, Any], trainers: int) -> tuple[Any, Any, torch.dtype]:
        args = policy.model_args_from_hf(config)
        mesh = DeviceMesh.from_group(self.meshes[trainers], self.device.type, mesh_dim_names=("fsdp",))
        param_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32  # as Trainer.__init__
        # DTensor's random init would otherwise seed its RNG tracker with a broadcast over the whole
        # default group, which the receivers never join: seed it on the trainer mesh alone.
        dtensor_random.manual_seed(0, mesh)
        model = policy.build_model(args, mesh, self.device, param_dtype)
        return model, Qwen3StateDictAdapter(args, None), policy.hf_dtype(config)

    def _case(
        self,
        name: str,
        trainers: int,
        receivers: int,
        buckets: list[int],
        role: str,
        trainer_model: tuple | None,
        receiver_model: VllmQwen3 | None,
    ) -> None:
        """One (model, T, R) case: every bucket size, its rounds and its raw-broadcast baseline."""
        rounds = self.args.rounds + 2  # a warm-up, the timed rounds, one instrumented round
        # Every rank counts formations and updates, so that group names and update ids agree.
        self.formations += 1
        group_name = f"bench{self.formations}"
        if role == "idle" or (role == "trainer" and self.rank != 0):
            if role == "trainer":  # the engine's other ranks: rank 0's checksum, then each round's gathers as
                self._checksum(trainer_model)  # Trainer.publish_weights runs them (iterate, drop), nothing sent
                for _ in range(len(buckets) * rounds):
                    for _ in policy.iter_hf_weights(*trainer_model):
                        pass
            self.sends += len(buckets) * rounds
            return
        world = 1 + receivers
        if role == "trainer":
            self.sender.close()
            group = self.sender.join(group_name, world)
            model, adapter, dtype = trainer_model
            params = [[w["name"], w["dtype"], w["shape"]] for w in policy.hf_weight_names(model, adapter, dtype)]
            checksum = self._checksum(trainer_model)
            # What the runtime's /weights/update body carries, and a reference the receivers check against.
            group.store.set(f"bench/{group_name}/params", json.dumps([params, checksum]))
        else:
            if self.store is None:
                self.store = weight_sync.open_store(self.sync_addr, is_master=False)
            rank = self.rank - trainers + 1
            group = weight_sync.join_group(
                self.store, group=group_name, rank=rank, world_size=world, backend=self.args.backend, device=self.device
            )
            receiver = WeightReceiver(group)
            params, checksum = json.loads(group.store.get(f"bench/{group_name}/params"))
        total = sum(weight_sync.ParamSpec.parse(p).nbytes for p in params)
        for bucket_mib in buckets:
            bucket_bytes = bucket_mib << 20
            real: list[float] = []
            pauses: list[float] = []
            phases: list[list[float]] = []
            for round_ in range(rounds):
                instrumented = round_ == rounds - 1
                last_real = round_ == rounds - 2
                if last_real and role == "receiver":
                    for t in receiver_model.unique():  # poison: the last real round must write every element
                        t.fill_(float("nan"))
                _meet(group)
                clock = PhaseClock(group) if instrumented else contextlib.nullcontext()
                traced = last_real and self.args.trace and (trainers, receivers) == self.args.cases[0]
                profiler = self._profiler(f"{name}-{trainers}x{receivers}-{bucket_mib}M") if traced else None
                self.sends += 1
                start = time.perf_counter()
                with clock, profiler or contextlib.nullcontext():
                    if role == "trainer":
                        self.sender.bucket_bytes = bucket_bytes
                        weights = policy.iter_hf_weights(*trainer_model)
                        self.sender.send(weights, version=self.sends, params=params)
                    else:
                        update_id = f"{group_name}-{self.sends}"
                        receiver.receive(params, bucket_bytes, receiver_model.load_weights, update_id=update_id)
                _sync(self.device)
                seconds = time.perf_counter() - start
                if role == "trainer" and self.sender._updates != self.sends:
                    raise RuntimeError("the bench lost count of updates: receivers would wait for another id")
                if last_real and role == "receiver":
                    got = sum(float(t.double().sum()) for t in receiver_model.unique())
                    if not math.isclose(got, checksum, rel_tol=1e-9, abs_tol=1e-3):
                        raise RuntimeError(
                            f"rank {self.rank}: received weights sum to {got}, the trainer's to {checksum}"
                        )
                mine = [seconds, clock.outside, clock.wire] if instrumented else [seconds]
                values = self._collect(group, f"{bucket_mib}/{round_}", mine)
                if role != "trainer":
                    continue
                if instrumented:
                    phases = values
                elif round_:
                    real.append(max(v[0] for v in values))
                    pauses.append(max(v[0] for v in values[1:]))
            raw = []
            for round_ in range(self.args.rounds + 1):
                _meet(group)
                values = self._collect(group, f"{bucket_mib}/raw{round_}", [raw_broadcast(group, total)])
                if round_ and role == "trainer":
                    raw.append(max(v[0] for v in values))
            if role == "trainer":
                best = min(range(len(real)), key=real.__getitem__)
                result = Result(
                    model=name,
                    trainers=trainers,
                    receivers=receivers,
                    gpus=min(trainers + receivers, self.gpus),
                    bucket_mib=bucket_mib,
                    buckets=len(weight_sync.plan_buckets(params, bucket_bytes)),
                    gbytes=total / 1e9,
                    total_ms=real[best] * 1e3,
                    total_median_ms=statistics.median(real) * 1e3,
                    pause_ms=pauses[best] * 1e3,
                    raw_ms=min(raw) * 1e3,
                    gather_pack_ms=phases[0][1] * 1e3,
                    wire_ms=phases[0][2] * 1e3,
                    load_ms=max(v[1] for v in phases[1:]) * 1e3,
                    instrumented_ms=max(v[0] for v in phases) * 1e3,
                )
                self.results.append(result)
                print(json.dumps(asdict(result) | {"ratio": round(result.ratio, 3)}), flush=True)
        if role == "trainer":
            self.sender.close()
        else:
            group.close()

    def _profiler(self, tag: str) -> torch.profiler.profile:
        """A torch profiler for one real round: its Chrome trace and a summary table go to --trace."""
        out = Path(self.args.trace)
        out.mkdir(parents=True, exist_ok=True)

        def write(prof: torch.profiler.profile) -> None:
            prof.export_chrome_trace(str(out / f"{tag}-rank{self.rank}.json"))
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            cuda = prof.key_averages().table(sort_by="self_device_time_total", row_limit=15)
            (out / f"{tag}-rank{self.rank}.txt").write_text(f"{table}\n{cuda}\n")

        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        return torch.profiler.profile(activities=activities, on_trace_ready=write)

    def _checksum(self, trainer_model: tuple) -> float:
        """The sum of every full parameter, gathered as publish gathers them (collective over the trainer ranks)."""
        model, adapter, dtype = trainer_model
        return sum(float(t.to(dtype).double().sum()) for _, t in policy.iter_hf_weights(model, adapter, dtype))

    def _collect(self, group: SyncGroup, tag: str, values: list[float]) -> list[list[float]]:
        """Every group rank's `values` (rank order) on the sender; others get only their own."""
        key = f"bench/{group.prefix}/{tag}"
        group.store.set(f"{key}/{group.rank}", json.dumps(values))
        if group.rank:
            return [values]
        return [json.loads(group.store.get(f"{key}/{r}")) for r in range(group.world_size)]


def _entry(rank: int, world: int, args: argparse.Namespace) -> None:
    results = Bench(rank, world, args).run()
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps([asdict(r) for r in results], indent=1))
        print_table(results)
    dist.destroy_process_group()


def print_table(results: list[Result]) -> None:
    header = (
        "model        TxR  GPUs bucket  n    GB    total ms  (median)  raw ms  ratio  pause ms | "
        "instrumented: gather+pack  wire  unpack+load"
    )
    print(header)
    for r in results:
        print(
            f"{r.model:<12} {r.trainers}x{r.receivers} {r.gpus:>4} {r.bucket_mib:>5}M {r.buckets:>4} {r.gbytes:>5.2f} "
            f"{r.total_ms:>9.1f} {r.total_median_ms:>9.1f} {r.raw_ms:>7.1f} {r.ratio:>6.2f} {r.pause_ms:>9.1f} | "
            f"{r.gather_pack_ms:>25.1f} {r.wire_ms:>5.1f} {r.load_ms:>12.1f}"
        )


def _cases(text: str) -> list[tuple[int, int]]:
    cases = [tuple(int(n) for n in item.split("x")) for item in text.split(",")]
    if any(len(c) != 2 or min(c) < 1 for c in cases):
        raise argparse.ArgumentTypeError(f"{text!r}: expected TRAINERSxRECEIVERS,... e.g. 1x1,2x2")
    return cases  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=["qwen3-1.7b"], help=", ".join(QWEN3))
    parser.add_argument("--cases", type=_cases, default=[(1, 1)], help="TxR,...: trainer GPUs x receiver GPUs")
    parser.add_argument("--bucket-mb", type=lambda s: [int(x) for x in s.split(",")], default=[256],
                        help="bucket sizes (MiB) swept on the first case")  # fmt: skip
    parser.add_argument("--default-bucket-mb", type=int, default=weight_sync.DEFAULT_BUCKET_BYTES >> 20,
                        help="bucket size (MiB) of the other cases")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after a warm-up)")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--out", default="runs/bench/weight_sync.json")
    parser.add_argument("--trace", default="", help="directory: profile the first case's last timed round there")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in QWEN3]
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {', '.join(QWEN3)}")
    world = max(t + r for t, r in args.cases)
    if args.backend == "nccl" and max(r for _, r in args.cases) + 1 > torch.cuda.device_count():
        parser.error(f"--cases: the sender and each receiver need a GPU of their own; {torch.cuda.device_count()} here")
    args.ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.ports.append(s.getsockname()[1])
    mp.start_processes(_entry, args=(world, args), nprocs=world, start_method="spawn")


if __name__ == "__main__":
    main()
