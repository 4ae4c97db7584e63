"""Multi-process (``torchrun``) helpers: process group, rank-0 decisions, sharded work, ordered gathers.

Every helper degrades to the plain single-process behaviour when no process group is running, so
library code calls them unconditionally. Conventions (see docs/distributed.md):

* one process per device; ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; CUDA runs use
  NCCL and ``cuda:LOCAL_RANK``, CPU runs use Gloo;
* work over a dataset is split into *contiguous* blocks (``shard_indices``), so concatenating the
  blocks in rank order (``all_gather_cat``) gives back dataset order exactly;
* decisions that touch the file system or can fail on bad user input are taken by rank 0 and
  broadcast (``rank0_decides``): every rank then raises the same error instead of some ranks
  waiting forever in the next collective.
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from . import errors
from .utils import resolve_device

T = TypeVar("T")


# ----------------------------------------------------------------------------- process group

def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (``torchrun``, SLURM wrappers)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


@dataclass
class DistContext:
    """What ``init_distributed`` set up; ``owns_group`` says whether ``shutdown`` should destroy it."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """Join the ``torchrun`` process group (if launched by it) and pick this process's device.

    Under torchrun, ``device`` ``auto``/``cuda``/``cuda:N`` all mean ``cuda:LOCAL_RANK`` (one GPU per
    process); CPU runs use the Gloo backend. A group the caller already started is reused as is.
    """
    dev = resolve_device(device)
    if not launched_by_torchrun() and not is_distributed():
        return DistContext(dev)
    lr = local_rank()
    if "LOCAL_RANK" not in os.environ and is_distributed() and dev.type == "cuda":
        lr = dist.get_rank() % torch.cuda.device_count()  # a group started without torchrun (mp.spawn)
    if dev.type == "cuda":
        dev = torch.device("cuda", lr)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        owns = True
    return DistContext(dev, dist.get_rank(), dist.get_world_size(), lr, dist.get_backend(), owns)


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        # every rank reaches this point before the group is torn down: destroying it while a peer
        # still has a Gloo operation in flight aborts that process ("terminate called ...")
        # Free the run's DDP reducer / SyncBN objects (often held by reference cycles) while the
        # group still exists, rather than in interpreter-exit destructors after it is gone.
        gc.collect()
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- collectives

def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; Gloo moves CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduced copy of ``tensor`` (on its own device); identity in a single process."""
    if not is_distributed():
        return tensor
    buf = tensor.detach().to(_comm_device(), copy=True)
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(buf, op=reduce_op)
    return buf.to(tensor.device)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order (sizes may differ per rank)."""
    if not is_distributed():
        return tensor
    dev = _comm_device()
    n = torch.tensor([tensor.shape[0]], device=dev, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=dev)
    padded[: tensor.shape[0]] = tensor.to(dev)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(tensor.device)


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    Without SyncBatchNorm each rank updates its running statistics from its own batches; evaluating
    after this makes every rank use exactly the model that rank 0 saves.
    """
    if not is_distributed():
        return
    dev = _comm_device()
    for buf in module.buffers():
        tmp = buf.detach().to(dev, copy=True)
        dist.broadcast(tmp, src=src)
        buf.data.copy_(tmp.to(buf.device))


def rank0_decides(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and broadcast its result, or its error, to every rank.

    For steps that must happen once (creating the run directory) or whose failure must stop all
    ranks together; a ``LowshotError`` is re-raised on every rank with rank 0's message.
    """
    if not is_distributed():
        return fn()
    payload: tuple[str, Any, str] | None = None
    failure: BaseException | None = None
    if is_main():
        try:
            payload = ("ok", fn(), "")
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            failure = e
            payload = ("error", type(e).__name__, str(e))
    payload = broadcast_object(payload)
    assert payload is not None
    status, value, message = payload
    if status == "ok":
        return value
    if failure is not None:
        raise failure
    cls = getattr(errors, value, None)
    if isinstance(cls, type) and issubclass(cls, errors.LowshotError):
        raise cls(message)
    raise RuntimeError(f"rank 0 failed with {value}: {message}")


def rank0_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then (if it succeeded) on the other ranks; each keeps its own result.

    For loading data: a download or cache build happens once, and a missing dataset stops every
    rank with rank 0's error.
    """
    if not is_distributed():
        return fn()
    held: list[T] = []
    rank0_decides(lambda: held.append(fn()))
    return held[0] if is_main() else fn()


# ----------------------------------------------------------------------------- sharded work

def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous block of ``range(n)``; blocks differ in size by at most one."""
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    if not 0 <= r < w:
        raise errors.ConfigError(f"need 0 <= rank < world size, got rank {r} of {w}")
    return range(n * r // w, n * (r + 1) // w)


# ----------------------------------------------------------------------------- BatchNorm

class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: d(sum_r L_r)/dx on every rank."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = grad.clone()
        dist.all_reduce(out)
        return out


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch (every rank), on any backend.

    ``nn.SyncBatchNorm`` only runs on GPUs; this is the CPU/Gloo counterpart used by
    ``convert_sync_batchnorm`` (two differentiable all-reduces per layer: the sum, then the sum of
    squared deviations). Its state dict keys are BatchNorm's, so checkpoints load into plain models.
    Outside training or a process group it is an ordinary BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = all_reduce(torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64, device=x.device))
        n = float(count)
        mean = _SumOverRanks.apply(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm use global-batch statistics: ``nn.SyncBatchNorm`` on CUDA, else ours."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        out = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        state = module.state_dict()
        if state:
            out.to(next(iter(state.values())).device)
        out.load_state_dict(state)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
