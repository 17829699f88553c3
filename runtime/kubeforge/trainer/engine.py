"""One trainer rank: the sharded policy, its optimizer, and the operations all ranks run together.

Every public method here except `weight_names` is collective: all ranks call it, in the same
order, with the same arguments. Rank 0 learns what to do from HTTP and tells the others
through the command channel (`run`); the others sit in `follow`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torchtitan.distributed.utils import clip_grad_norm_

from kubeforge import auth
from kubeforge.batch import BatchError, TrainBatch
from kubeforge.contract import RoleContext
from kubeforge.losses import LOSSES, Normalise, Normalisers, check_settings, choose, policy_loss
from kubeforge.reference.model import load_frozen
from kubeforge.trainer import checkpoint as checkpoints
from kubeforge.trainer import model as policy
from kubeforge.trainer.commands import STOP, Command, CommandChannel
from kubeforge.weight_sync import WeightSender

log = logging.getLogger("kubeforge.trainer")

# On-disk checkpoints (all or nothing, a COMPLETE marker last) live in checkpoint.py.
CHECKPOINT_PREFIX = checkpoints.CHECKPOINT_PREFIX
APP_STATE_FILE = checkpoints.APP_STATE_FILE
TOTALS_FILE = checkpoints.TOTALS_FILE
completed_checkpoints = checkpoints.completed_checkpoints


class PublishError(RuntimeError):
    """Weight sync failed on rank 0 after every rank did its part: the trainer can go on."""


def init_process_group(ctx: RoleContext) -> torch.device:
    """Join the trainer's own group (torchrun's environment says where and who); return this rank's device."""
    if ctx.spec.roles.trainer.gpus_per_node > 0:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    dist.barrier()
    log.info("rank %d of %d joined the trainer group", dist.get_rank(), dist.get_world_size())
    return device


def check_tokens(batch: TrainBatch, vocab: int, max_length: int) -> None:
    """Raise BatchError for token ids or a length the model cannot take."""
    if int(batch.input_ids.min()) < 0 or int(batch.input_ids.max()) >= vocab:
        raise BatchError(f"input_ids: token ids must lie in [0, {vocab}), the model's vocabulary")
    if batch.input_ids.shape[1] > max_length:
        raise BatchError(f"input_ids: {batch.input_ids.shape[1]} positions; the model takes at most {max_length}")


class Trainer:
    def __init__(self, ctx: RoleContext, device: torch.device):
        spec = ctx.spec
        if spec.roles.trainer.tensor_parallel > 1:
            raise NotImplementedError("tensorParallel > 1: the trainer shards with FSDP only so far")
        self.ctx = ctx
        self.settings = spec.algorithm
        check_settings(self.settings)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.channel = CommandChannel()
        self._lock = threading.Lock()  # rank 0: one command in flight at a time

        self.model_dir = Path(spec.model.path)
        self.hf_config = policy.read_hf_config(self.model_dir)
        args = policy.model_args_from_hf(self.hf_config)
        self.adapter = policy.state_dict_adapter(args)
        self.publish_dtype = policy.hf_dtype(self.hf_config)
        mesh = init_device_mesh(device.type, (self.world_size,), mesh_dim_names=("fsdp",))
        param_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # fp32 master weights either way
        self.model = policy.build_model(args, mesh, device, param_dtype, self.settings.activation_checkpointing)
        # Fixed by the model's structure; a publish would otherwise map every name again (ms at 1.7B).
        self._weight_names = policy.hf_weight_names(self.model, self.adapter, self.publish_dtype)
        s = self.settings
        # Fused AdamW (torchtitan's default on GPU): one kernel over all parameters, 40 -> 20 ms a
        # step at 1.7B (docs/benchmarks.md, B6), and it can skip a non-finite step on the device
        # (`train`). Fused on CPU too, so that the tests run the GPU's code path.
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=s.lr,
            betas=s.betas,
            eps=s.adam_eps,
            weight_decay=s.weight_decay,
            fused=True,
        )
        self.step = 0  # train steps run
        self.policy_version = 0  # optimizer updates applied: the version of the weights held
        self.checkpoint_dir = ctx.run_dir / spec.checkpoint.dir
        self.last_checkpoint: Path | None = None
        self.sender: WeightSender | None = None  # rank 0's, once the generators are connected
        # How many policy versions a sample may lag (0 in sync mode), and how many rows lagged how much.
        self.staleness_bound = spec.staleness_bound
        self.staleness_seen: Counter[int] = Counter()
        reference = spec.roles.reference
        # Colocated: a frozen copy of the initial weights, sharded like the policy, fills missing ref_logprobs.
        self.reference = (
            load_frozen(self.model_dir, mesh, device, param_dtype) if reference.enabled and reference.colocate else None
        )

        # The newest checkpoint whose every part is durable; rank 0 logs the newer ones it skipped.
        newest = checkpoints.newest(self.checkpoint_dir) if self.rank == 0 else None
        resume = self._agree([newest] if newest else [])
        if resume:
            self.load_checkpoint(resume[0])
        else:
            policy.load_hf_weights(self.model, self.adapter, self.model_dir)
            if self.rank == 0:
                log.info("loaded %s (%s)", self.model_dir, self.hf_config.get("architectures"))

    # -- lockstep ---------------------------------------------------------------------------

    def run(self, command: Command) -> Any:
        """Rank 0: have every rank run `command`; return rank 0's result."""
        with self._lock:
            self.channel.send(command)
            return self.execute(command)

    def follow(self) -> None:
        """Ranks other than 0: run rank 0's commands until it says stop, then leave the groups."""
        while (command := self.channel.receive()).name != STOP:
            try:
                self.execute(command)
            except BatchError:  # every rank refused it the same way, before any collective: still in step
                continue
        dist.destroy_process_group()

    def stop(self) -> None:
        """Rank 0: release the other ranks from their wait for the next command, then leave the groups."""
        self.run(Command(STOP))
        dist.destroy_process_group()

    def execute(self, command: Command) -> Any:
        match command.name:
            case "train":
                return self.train(TrainBatch.decode(command.payload))
            case "evaluate":
                return self.evaluate(TrainBatch.decode(command.payload))
            case "checkpoint":
                return self.save_checkpoint(command.args.get("app_state"))
            case "export":
                return self.export_hf(Path(command.args["dir"]))
            case "publish":
                return self.publish_weights(command.args["generators"], command.args["reconnect"])
            case "stop":
                return None
        raise ValueError(f"unknown trainer command {command.name!r}")

    def _agree(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (paths on a shared volume may look different elsewhere)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.channel.group)
        return box[0]

    # -- training -----------------------------------------------------------------------------

    def check(self, batch: TrainBatch) -> None:
        """Raise BatchError for a batch this model cannot take (rank 0 asks before any rank sees it)."""
        check_tokens(batch, self.hf_config["vocab_size"], self.model.model_args.max_seq_len)
        name = self._loss_name(batch)
        variant = LOSSES[name]
        if batch.position_ids is not None and variant.normalise is not Normalise.TOKEN:
            # Its normalisers count rows as sequences; a packed row holds several.
            raise BatchError(f"position_ids: packed rows need a token-level loss (dapo, cispo, sft); {name!r} is not")
        needs_reference = variant.policy_gradient and self.settings.kl_coef > 0
        if needs_reference and batch.ref_logprobs is None and self.reference is None:
            raise BatchError(
                f"ref_logprobs: missing, and klCoef is {self.settings.kl_coef} with no colocated reference "
                "(spec.roles.reference.colocate): the controller must fill them (kubeforge.reference.ReferenceClient)"
            )
        lags = self.policy_version - batch.policy_versions
        if int(lags.max()) > self.staleness_bound:
            row = int(lags.argmax())
            raise BatchError(
                f"policy_versions: row {row} was sampled by policy version {int(batch.policy_versions[row])}, "
                f"{int(lags[row])} behind the trainer's {self.policy_version}; this job allows at most "
                f"{self.staleness_bound} (spec.mode {self.ctx.spec.mode!r}, spec.maxStaleness)"
            )

    def _loss_name(self, batch: TrainBatch) -> str:
        """The batch's own loss (info["loss"], e.g. "sft" for a warm-up batch), else the job's."""
        loss = batch.info.get("loss", self.settings.loss)
        try:
            choose("info.loss", loss, LOSSES)
        except ValueError as e:
            raise BatchError(str(e)) from None
        return loss

    def train(self, batch: TrainBatch) -> dict[str, Any]:
        """One optimizer step on `batch`, split across the ranks; metrics are batch-wide."""
        started = time.perf_counter()
        # Again, on every rank: another request may have moved the policy version since rank 0's check.
        self.check(batch)
        s = self.settings
        loss_name = self._loss_name(batch)
        settings = s.loss_settings(loss_name)
        policy_gradient = LOSSES[loss_name].policy_gradient
        fill_reference = policy_gradient and s.kl_coef > 0 and self.reference is not None and batch.ref_logprobs is None
        norm = Normalisers.of(batch.response_mask)  # batch-wide: every rank's share adds up
        self.optimizer.zero_grad()
        # loss, then each metric: already divided by the batch's normalisers, so they add up
        totals: dict[str, torch.Tensor] = {}
        for micro in self._micro_batches(batch):
            logprobs = policy.token_logprobs(self.model, micro.input_ids, s.temperature, micro.position_ids)
            ref_logprobs = micro.ref_logprobs
            if fill_reference:
                with torch.no_grad():
                    ref_logprobs = policy.token_logprobs(
                        self.reference, micro.input_ids, s.temperature, micro.position_ids
                    )
            loss, metrics = policy_loss(
                logprobs,
                micro.behaviour_logprobs,
                micro.advantages,
                micro.response_mask,
                ref_logprobs,
                settings=settings,
                norm=norm,
            )
            # FSDP averages gradients over the ranks; each rank's loss is its share of the batch-wide
            # mean, so scaling by the world size makes the average the gradient of their sum.
            # (torchtitan turns the averaging off instead, which gloo cannot do: no PREMUL_SUM.)
            (loss * self.world_size).backward()
            for name, value in {"loss": loss.detach(), **metrics}.items():
                totals[name] = totals.get(name, 0) + value
        grad_norm = clip_grad_norm_(list(self.model.parameters()), s.max_grad_norm, foreach=True)
        # A non-finite gradient would poison the weights: the fused kernel skips the whole update
        # (step counts included) when found_inf is set, as GradScaler has it do. Deciding on the
        # device lets the host queue the step without waiting for the norm (docs/benchmarks.md, B6).
        finite = torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~finite).float()
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr_at(self.step, self.ctx.spec.steps)
        self.optimizer.step()
        updated = bool(finite)
        if not updated:  # the update was skipped: keep the version
            log.warning("step %d: gradient norm %s, update skipped", self.step + 1, grad_norm.item())
        lags = Counter((self.policy_version - batch.policy_versions).tolist())
        self.staleness_seen.update(lags)
        self.policy_version += int(updated)
        self.step += 1
        names = sorted(totals)  # the same keys on every rank: same settings, same batch
        reduced = torch.stack([totals[name] for name in names])
        dist.all_reduce(reduced)
        values = dict(zip(names, reduced.tolist(), strict=True))
        # The controller's state as of this step travels in the batch: a checkpoint and it always match.
        checkpoint = self.save_checkpoint(batch.info.get("app_state")) if self._checkpoint_due() else None
        seconds = time.perf_counter() - started
        return {
            "step": self.step,
            "policy_version": self.policy_version,
            "updated": updated,
            "loss_variant": loss_name,
            "grad_norm": grad_norm.item(),
            **values,
            "tokens": batch.num_tokens,
            "samples": batch.rows,
            "staleness_max": max(lags),
            "staleness": {str(lag): n for lag, n in sorted(lags.items())},
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_seconds": seconds,
            "tokens_per_second": batch.num_tokens / seconds,
            "checkpoint": str(checkpoint) if checkpoint else None,
        }

    def evaluate(self, batch: TrainBatch) -> dict[str, Any]:
        """The loss `train` would report on `batch` (e.g. a held-out split's), with no update."""
        self.check(batch)
        settings = self.settings.loss_settings(self._loss_name(batch))
        norm = Normalisers.of(batch.response_mask)
        total = torch.zeros((), device=self.device)
        with torch.no_grad():
            for micro in self._micro_batches(batch):
                logprobs = policy.token_logprobs(
                    self.model, micro.input_ids, self.settings.temperature, micro.position_ids
                )
                loss, _ = policy_loss(
                    logprobs, micro.behaviour_logprobs, micro.advantages, micro.response_mask, micro.ref_logprobs,
                    settings=settings, norm=norm,
                )  # fmt: skip
                total += loss
        dist.all_reduce(total)
        return {
            "loss": total.item(),
            "tokens": batch.num_tokens,
            "samples": batch.rows,
            "policy_version": self.policy_version,
        }

    def staleness_totals(self) -> dict[str, int]:
        """Rows trained on so far, by how many policy versions they lagged (kept across a resume)."""
        return {str(lag): n for lag, n in sorted(self.staleness_seen.items())}

    def _micro_batches(self, batch: TrainBatch) -> Iterator[TrainBatch]:
        """This rank's rows (every world_size-th), on the device, in passes of micro_batch_size.

        Every rank runs the same number of forward/backward passes (FSDP's collectives pair up
        across ranks), so a rank short of rows pads with copies of row 0 that carry no tokens.
        """
        rows_per_rank = -(-batch.rows // self.world_size)
        mine = torch.arange(batch.rows)[self.rank :: self.world_size]
        padding = rows_per_rank - len(mine)
        shard = batch.select(torch.cat([mine, torch.zeros(padding, dtype=torch.long)]))
        shard.response_mask[len(mine) :] = False
        size = self.settings.micro_batch_size or rows_per_rank
        for start in range(0, rows_per_rank, size):
            micro = shard.select(slice(start, start + size))
            # Columns after the last response token change nothing (causal attention): cut them.
            used = micro.response_mask.any(0).nonzero()
            length = int(used.max()) + 1 if len(used) else 2
            yield micro.truncate(length).to(self.device)

    # -- checkpoints ----------------------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        interval = self.ctx.spec.checkpoint.interval
        return bool(interval) and self.step % interval == 0

    def _counters(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step), "policy_version": torch.tensor(self.policy_version)}

    def save_checkpoint(self, app_state: dict[str, Any] | None = None) -> Path:
        """DCP checkpoint of model, optimizer, step and policy version (plus the app's state, if given)."""
        path = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        if path != self.last_checkpoint:
            if self.rank == 0 and path.exists():
                # Left by a save that crashed (incomplete, skipped on resume): start it afresh.
                log.warning("replacing %s (%s)", path, checkpoints.check(path) or "from another run of this step")
                checkpoints.remove(path)
            dist.barrier()
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
            state = {"model": model_state, "optimizer": optimizer_state, "trainer": self._counters()}
            dcp.save(state, checkpoint_id=str(path))  # every rank's files fsynced, .metadata last
        if self.rank == 0:
            # The small parts through a temporary file and a rename, then COMPLETE, last.
            checkpoints.commit(path, totals=self.staleness_totals(), app_state=app_state)
        dist.barrier()  # COMPLETE is written: the checkpoint counts
        if self.rank == 0 and path != self.last_checkpoint:
            checkpoints.prune(self.checkpoint_dir, self.ctx.spec.checkpoint.keep)
            log.info("checkpoint %s (policy version %d)", path, self.policy_version)
        self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: Path) -> None:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, "trainer": self._counters()}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.step = int(state["trainer"]["step"])
        self.policy_version = int(state["trainer"]["policy_version"])
        totals = path / TOTALS_FILE
        if totals.exists():  # not in checkpoints written before it was
            self.staleness_seen = Counter(
                {int(lag): n for lag, n in json.loads(totals.read_text())["staleness"].items()}
            )
        self.last_checkpoint = path
        if self.rank == 0:
            log.info("resumed from %s: step %d, policy version %d", path, self.step, self.policy_version)

    def app_state(self) -> dict[str, Any] | None:
        """What the controller saved with the checkpoint this trainer resumed from or last wrote."""
        path = self.last_checkpoint and checkpoints.app_state_file(self.last_checkpoint)
        return json.loads(path.read_text()) if path and path.exists() else None

    # -- weights in the generator's names ---------------------------------------------------------

    def weight_names(self) -> list[dict[str, Any]]:
        """What `iter_hf_weights` yields: HF name, dtype, shape. Local, no communication."""
        return self._weight_names

    def iter_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor), one parameter at a time; cast to `publish_dtype`, the published weight.
        Collective; each tensor is valid until the next is asked for."""
        return policy.iter_hf_weights(self.model, self.adapter, self.publish_dtype)

    def publish_weights(self, generators: list[str], reconnect: bool = False) -> dict[str, Any]:
        """Send the current weights to `generators` through weight sync, as policy_version.

        Rank 0 sends; the other ranks only take part in each FSDP block's all-gather.
        """
        weights = self.iter_hf_weights()
        try:
            if self.rank != 0:
                return {}
            try:
                sender = self._connect(generators, reconnect)
                params = [[w["name"], w["dtype"], w["shape"]] for w in self.weight_names()]
                stats = sender.send(weights, version=self.policy_version, params=params)
            except Exception as e:
                if self.sender is not None:
                    self.sender.close()  # the next publish forms the group anew
                raise PublishError(f"{type(e).__name__}: {e}") from e
            return {"policy_version": self.policy_version, "seconds": stats.seconds, "bytes": stats.bytes}
        finally:
            for _ in weights:  # finish the gathers the other ranks are in, even if the send failed
                pass

    def _connect(self, generators: list[str], reconnect: bool) -> WeightSender:
        """Rank 0's sender, its group formed anew when the generators changed or on request."""
        if self.sender is None:
            self.sender = WeightSender(
                self.ctx.weight_sync_addr,
                bucket_bytes=self.settings.weight_sync_bucket_bytes,
                device=self.device,
                token=self.ctx.credentials.token(auth.TRAINER),  # what the generators' weight routes need
            )
        wanted = [url.rstrip("/") for url in generators]
        if reconnect or self.sender.group is None or self.sender.generator_urls != wanted:
            self.sender.connect(wanted)
        return self.sender

    def export_hf(self, out_dir: Path) -> Path:
        """Write the current weights as an HF checkpoint (the model directory's other files copied)."""
        # Every rank runs the loop (each FSDP block is an all-gather); rank 0 keeps a copy of what it
        # gathers (a yielded tensor is only valid until the next).
        weights = {
            name: tensor.to("cpu", self.publish_dtype, copy=True)
            for name, tensor in self.iter_hf_weights()
            if self.rank == 0
        }
        if self.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            for item in self.model_dir.iterdir():
                if item.is_file() and not item.name.endswith((".safetensors", ".safetensors.index.json")):
                    shutil.copy2(item, out_dir / item.name)
            save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
        dist.barrier()
        return out_dir
