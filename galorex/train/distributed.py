"""``galorex-train --distributed ddp|fsdp2`` under ``torchrun``: process group, model wrapping, the
rank's share of each batch, and checkpoints (one ``.pt`` file under DDP, a sharded
``torch.distributed.checkpoint`` folder under FSDP2, both appearing atomically).

Every rank draws the same global batch of ``--batch-size`` sequences and trains on its contiguous
``batch_size / world_size`` rows; the gradient all-reduce (DDP) or reduce-scatter (FSDP2) averages
the ranks' mean losses, which is the mean over the global batch: the same step as one process on
the whole batch, up to rounding.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .atomic import atomic_write, fsync_dir
from .checkpoint import CheckpointError, load_checkpoint

MODES = ("none", "ddp", "fsdp2")
_DCP_RE = re.compile(r"^ckpt-(\d+)\.dcp$")
EXTRA = "extra.pt"  # the non-tensor part of a sharded checkpoint (step, config, scheduler, data, RNG)


class DistributedError(ValueError):
    """A distributed setup the command cannot run (reported like any bad input)."""


@dataclass
class Context:
    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # whether we initialised the process group (and tear it down)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def local_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch."""
        if not self.active:
            return x
        per_rank = x.shape[0] // self.world_size
        return x[self.rank * per_rank : (self.rank + 1) * per_rank]

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def average_gradient(self, grad: torch.Tensor) -> None:
        """In place: the mean of this gradient over the ranks (DDP's all-reduce, for one tensor)."""
        dist.all_reduce(grad)
        grad.div_(self.world_size)

    def close(self, wait: bool = True) -> None:
        """Leave the process group we joined. ``wait``: first let every rank finish (rank 0 hosts
        torchrun's store; without it a rank leaving early intermittently aborted another's exit
        in tests). Not after an error: the other ranks may never reach the barrier."""
        if self.owns_group and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()


def setup(mode: str, device_name: str, batch_size: int) -> tuple[Context, str]:
    """Join the process group torchrun describes; returns the context and the device to use."""
    if mode not in MODES:
        raise DistributedError(f"--distributed {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "none":
        return Context(), device_name
    if not dist.is_available():
        raise DistributedError(f"--distributed {mode}: this torch has no torch.distributed")
    if not dist.is_initialized() and "RANK" not in os.environ:
        raise DistributedError(
            f"--distributed {mode}: start it with torchrun, e.g. "
            f"`torchrun --nproc_per_node 2 -m galorex.train --distributed {mode} ...`"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if device_name.startswith("cuda:"):
        raise DistributedError("--device cuda:N with --distributed: each rank uses cuda:LOCAL_RANK; pass --device cuda")
    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    ctx = Context(mode, dist.get_rank(), dist.get_world_size(), local_rank, owns)
    if batch_size % ctx.world_size:
        ctx.close()
        raise DistributedError(
            f"--batch-size {batch_size} (the global batch) must be a multiple of the {ctx.world_size} processes"
        )
    return ctx, (f"cuda:{local_rank}" if use_cuda else "cpu")


def shard_as_built(ctx: Context, tie_embeddings: bool) -> Callable[[str, nn.Module], None] | None:
    """Under FSDP2, what ``build_llama(on_piece=...)`` calls as each piece of the model is
    materialised: each transformer block, and the embedding and head unless they are tied, is
    sharded there and then, so no rank ever holds the whole model (the full weights of one piece
    at a time; :func:`wrap_model` then shards the root). None otherwise.

    Every rank initialises each piece from the same seed before keeping its rows, so the weights
    are those one process would build."""
    if ctx.mode != "fsdp2":
        return None
    from torch.distributed.fsdp import fully_shard

    def on_piece(name: str, module: nn.Module) -> None:
        if name.startswith("layers.") or (name in ("embed", "lm_head") and not tie_embeddings):
            fully_shard(module)

    return on_piece


def wrap_model(ctx: Context, model: nn.Module, layerwise: bool = False) -> nn.Module:
    """The module to run forward/backward through: DDP around the model, or the model itself
    sharded in place by FSDP2 (each transformer block, then the root).

    DDP with layer-wise updates: no DDP wrapper (its all-reduce would come after the hooks that
    step each parameter, and its buckets would hold every gradient at once); rank 0's weights are
    broadcast as DDP would, and the optimizer averages each gradient over the ranks in its hook
    (``set_layerwise_grad_reducer``), one tensor at a time."""
    if ctx.mode == "ddp" and layerwise:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
        return model
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if ctx.mode == "fsdp2":
        from torch.distributed.fsdp import FSDPModule, fully_shard

        for block in model.layers:
            if not isinstance(block, FSDPModule):  # not already sharded as it was built
                fully_shard(block)
        fully_shard(model)
    return model


# ----------------------------------------------------------------------------- sharded checkpoints
def list_sharded_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete DCP checkpoints (folders renamed into place once whole), by increasing step."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _DCP_RE.match(p.name)
        if m and p.is_dir() and (p / EXTRA).is_file() and (p / ".metadata").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found, key=lambda sp: sp[0])


def latest_checkpoint(ctx: Context, directory: Path) -> Path | None:
    from .checkpoint import latest_checkpoint as latest_file

    if ctx.mode != "fsdp2":
        return latest_file(directory)
    found = list_sharded_checkpoints(directory)
    return found[-1][1] if found else None


def load_extra(ctx: Context, path: Path) -> dict[str, Any]:
    """The checkpoint dict the trainer expects; under FSDP2 ``model``/``optimizer`` name the DCP folder."""
    if ctx.mode != "fsdp2":
        return load_checkpoint(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a complete sharded (DCP) checkpoint folder")
    check_shard_files(path)
    extra = load_checkpoint(path / EXTRA)
    if isinstance(extra, dict):
        extra["model"] = extra["optimizer"] = str(path)
    return extra


def check_shard_files(path: Path) -> None:
    """Every file the checkpoint's metadata names is there (a rank's shards copied or synced
    incompletely would otherwise surface as a bare error deep inside the load).

    Raises:
        CheckpointError: naming the missing files (``__<rank>_<n>.distcp``: written by that rank).
    """
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated or foreign .metadata
        raise CheckpointError(f"{path / '.metadata'}: cannot be read as DCP metadata ({e})") from None
    names = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: missing shard file(s) {', '.join(missing)} of {len(names)} (each is written by one rank "
            "of the saving run); the checkpoint is incomplete"
        )


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Load a DCP checkpoint into the sharded model and optimizer, every rank its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if hasattr(optimizer, "rule"):  # a galorex optimizer: give DCP the state to load into
        from ..optim.sharded import materialize_state

        materialize_state(optimizer)
    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_sharded(
    ctx: Context,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    directory: Path,
    step: int,
    keep_last: int,
) -> Path:
    """Write ``directory/ckpt-<step>.dcp/`` atomically: every rank writes its shards into a hidden
    ``.ckpt-<step>.dcp.tmp/`` folder, rank 0 adds ``extra.pt``, and only once all of it is on disk
    does rank 0 rename the folder into place. A process killed at any moment leaves only
    complete ``ckpt-*.dcp`` folders (and perhaps a temporary one, which the next save removes)."""
    import torch.distributed.checkpoint as dcp

    final = directory / f"ckpt-{step:08d}.dcp"
    tmp = directory / f".ckpt-{step:08d}.dcp.tmp"
    if ctx.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        for p in directory.iterdir():  # leftovers of killed runs (one writer per folder)
            if p.name.startswith(".ckpt-") and p.name.endswith(".dcp.tmp"):
                shutil.rmtree(p, ignore_errors=True)
    ctx.barrier()
    dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp))  # fsyncs each file it writes
    if ctx.is_main:
        atomic_write(tmp / EXTRA, lambda f: torch.save(extra, f))
    ctx.barrier()  # every rank's shards are written
    if ctx.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(directory)
        old = list_sharded_checkpoints(directory)[:-keep_last] if keep_last else []
        for _, p in old:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    ctx.barrier()
    return final


def full_state_dict(ctx: Context, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU (gathered under FSDP2; every rank must call it)."""
    if ctx.mode != "fsdp2":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
