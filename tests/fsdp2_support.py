"""Multi-rank checks of the FSDP2 placement: every optimizer and state precision in one launch.

``launch(world, jobs, folder)`` starts ``world`` gloo processes once; for each job each runs every case of
:data:`CASES` in the same process group, in float64 (so that the comparisons test the placement,
not float32 rounding, which Adam and 8-bit codes amplify: docs/benchmarks.md measures float32
against its own floor). A run is 5 steps of one fixed global batch split across the ranks,
refreshes at steps 0, 2 and 4 (``update_proj_gap=2``), rank 4, ``moment_policy="reproject"``
where the optimizer has it, a constant learning rate; the model is sharded by ``fully_shard``
(llama-tiny: each block, then the root; the odd model: the root). Jobs:

- ``straight`` (``straight+save``): rank 0 first takes the 5 steps in one process on the whole batch (the reference)
  and, for the cases in :data:`FLOORED`, again with each step's gradient summed over the ranks'
  slices of the batch (how far one process is from itself when only the order of a sum changes:
  the floor of any comparison), then
  every rank takes them sharded (and writes a ``torch.distributed.checkpoint`` folder after step 3
  with ``galorex.train.distributed.save_sharded``, as galorex-train does); the final weights of
  both, and each rank's optimizer state bytes against the reference's;
- ``resume-from-N``: load the step-3 checkpoint that N ranks wrote (``load_sharded``: the state is
  resharded to this world size) and take steps 4 and 5.

Models: ``llama-tiny``, and ``odd`` — a few layers whose every size splits unevenly over 2 and 4
ranks (9, 13 and 48 rows; both projection sides), with an embedding whose 8-bit moments are grouped
by rows: each of 2 ranks holds 6144 entries and steps its rows alone, each of 4 ranks would hold
3072, below what is quantised, so there the embedding is stepped whole (a checkpoint moves between
the two).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

# case -> (optimizer name, options): every registered optimizer, every state precision, proj_type full.
CASES = {
    "galore": ("galore", {}),
    "galore-layerwise": ("galore", {"layerwise": True}),
    "galore-8bit-4bit": ("galore", {"optim_bits": 8, "basis_bits": 4}),
    "galore-8bit-rotated": ("galore", {"optim_bits": 8, "basis_bits": 8, "basis_rotation": True}),
    "galore-full": ("galore", {"proj_type": "full"}),
    "natural-galore": ("natural-galore", {}),
    "gradnorm-lorp": ("gradnorm-lorp", {}),
    "galore-adafactor": ("galore-adafactor", {"optim_bits": 8}),
    "fira": ("fira", {}),
    "apollo": ("apollo", {}),
    "apollo-mini": ("apollo-mini", {"optim_bits": 8}),
}
# What each model runs: llama-tiny the optimizers and precisions of the equality goals; the odd model
# every case, and every optimizer and precision (not each proj_type) through 2 -> 4 -> 2 ranks.
TINY_CASES = tuple(c for c in CASES if c not in ("galore-full", "galore-8bit-rotated"))
RESHARD_CASES = tuple(c for c in CASES if c not in ("galore", "galore-full"))
# Where one process is farther than 1e-9 from itself when only the order of a sum changes (float64,
# 5 steps): proj_type="full", whose Adam sees a 4×4 core with entries near 0 (3e-9 on llama-tiny).
FLOORED = ("galore-full",)
STEPS, SAVE_AT, BATCH, SEQ = 5, 3, 4, 8


class Odd(nn.Module):
    """Uneven splits everywhere (module docstring); the loss is next-token cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(48, 256)
        self.mlp_in = nn.Linear(256, 9)  # 9×256: projected on the left
        self.mlp_mid = nn.Linear(9, 13)  # 13×9: on the right
        self.attn_out = nn.Linear(13, 48)  # 48×13: on the right

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        h = torch.tanh(self.mlp_mid(torch.tanh(self.mlp_in(self.embed(x)))))
        logits = self.attn_out(h)
        return logits, nn.functional.cross_entropy(logits.reshape(-1, 48), y.reshape(-1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(case: str, model_name: str, sharded: bool):
    """The model (sharded or not) and the case's optimizer on it."""
    from torch.distributed.fsdp import fully_shard

    from galorex.models.llama import build_llama, get_config
    from galorex.optim.factory import build_optimizer

    name, options = CASES[case]
    if model_name == "llama-tiny":
        model = build_llama(get_config("llama-tiny"), dtype=torch.float64, seed=0)
        units = list(model.layers)
    else:
        torch.manual_seed(0)
        model = Odd().double()
        units = []  # one FSDP2 unit: a quarter of the collectives, and still every parameter split unevenly
    if sharded:
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
    settings = dict(lr=1e-2, rank=4, update_proj_gap=2, **options)
    if name not in ("apollo", "apollo-mini"):  # random projections cannot be reprojected
        settings["moment_policy"] = "reproject"
    layerwise = settings.pop("layerwise", False) and sharded  # the reference steps normally
    optimizer = build_optimizer(name, model, layerwise=layerwise, **settings)
    if layerwise:
        optimizer.register_fsdp2_hooks(model)
    return model, optimizer


def tokens(model_name: str) -> torch.Tensor:
    vocab = 256 if model_name == "llama-tiny" else 48
    return torch.randint(0, vocab, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def train(model, optimizer, steps: range, data: torch.Tensor, save=None, splits: int = 1) -> None:
    """``steps`` steps on ``data``; ``splits`` > 1: each step's gradient accumulated over that many
    equal slices of the batch (the ranks' slices), in one process."""
    for step in steps:
        for part in data.chunk(splits):
            _, loss = model(part[:, :-1], part[:, 1:])
            (loss / splits).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if save is not None and step + 1 == SAVE_AT:
            save()


def weights(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in model.state_dict().items()}


def worst_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, str, tuple[str, ...]]], folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for job, model_name, cases in jobs:
            results = _run(rank, world, job, model_name, cases, Path(folder))
            if rank == 0:
                Path(folder, f"{model_name}-{job}-{world}.json").write_text(json.dumps(results))
        dist.barrier()  # rank 0 hosts the store: nobody leaves while another still needs it
    finally:
        dist.destroy_process_group()


def _run(rank: int, world: int, job: str, model_name: str, cases: tuple[str, ...], folder: Path) -> dict:
    from galorex.optim.sharded import local_state_bytes
    from galorex.train.distributed import Context, list_sharded_checkpoints, load_sharded, save_sharded

    ctx = Context("fsdp2", rank, world, rank, owns_group=False)
    per_rank = BATCH // world
    data = tokens(model_name)
    local = data[rank * per_rank : (rank + 1) * per_rank]
    results = {}
    for case in cases:
        result = results[case] = {}
        if job.startswith("straight"):
            if rank == 0:
                model, optimizer = build(case, model_name, sharded=False)
                train(model, optimizer, range(STEPS), data)
                torch.save(weights(model), folder / f"{model_name}-{case}-1.pt")
                result["floor"] = 0.0
                if case in FLOORED:  # one process against itself, the batch summed in the ranks' slices
                    split, split_optimizer = build(case, model_name, sharded=False)
                    train(split, split_optimizer, range(STEPS), data, splits=world)
                    result["floor"] = worst_relative(weights(model), weights(split))
                result["single_state_bytes"] = local_state_bytes(optimizer)
            model, optimizer = build(case, model_name, sharded=True)
            ckpt = folder / f"{model_name}-{case}-{world}"

            def save(model=model, optimizer=optimizer, ckpt=ckpt):
                save_sharded(ctx, model, optimizer, {"step": SAVE_AT}, ckpt, SAVE_AT, keep_last=1)

            train(model, optimizer, range(STEPS), local, save if job == "straight+save" else None)
            state = [0] * world
            dist.all_gather_object(state, local_state_bytes(optimizer))
            result["state_bytes"] = state
        else:
            model, optimizer = build(case, model_name, sharded=True)
            source = int(job.removeprefix("resume-from-"))
            (_, path), *_ = list_sharded_checkpoints(folder / f"{model_name}-{case}-{source}")
            load_sharded(model, optimizer, str(path))
            train(model, optimizer, range(SAVE_AT, STEPS), local)
        final = weights(model)
        if rank == 0:
            torch.save(final, folder / f"{model_name}-{case}-{world}-{job.removesuffix('+save')}.pt")
    return results


def launch(world: int, jobs: list[tuple[str, str, tuple[str, ...]]], folder: Path) -> dict[tuple[str, str], dict]:
    """Run ``jobs`` — ("straight", "straight+save" or "resume-from-N", model, cases) — in order on
    one launch of ``world`` gloo processes; rank 0's results by (job, model)."""
    mp.spawn(_worker, args=(world, free_port(), jobs, str(folder)), nprocs=world, join=True)
    return {(job, m): json.loads((folder / f"{m}-{job}-{world}.json").read_text()) for job, m, _ in jobs}


def load(folder: Path, model_name: str, case: str, tag: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"{model_name}-{case}-{tag}.pt", weights_only=True)


# ----------------------------------------------------------------------------- Hugging Face route
HF_CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
HF_CASES = ("galore-8bit-4bit", "fira")  # the subspace and the whole-matrix strategies


def _hf_model_and_optimizer(case: str):
    import transformers

    from galorex.optim.factory import build_optimizer

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).double()
    name, options = CASES[case]
    optimizer = build_optimizer(name, model, lr=1e-2, rank=4, update_proj_gap=2, moment_policy="reproject", **options)
    return model, optimizer


def _hf_train(model, optimizer, data: torch.Tensor, backward) -> None:
    for _ in range(STEPS):
        backward(model(input_ids=data, labels=data).loss)
        optimizer.step()
        optimizer.zero_grad()


def _hf_worker(rank: int, world: int, port: int, folder: str) -> None:
    """The optimizer is built on the plain model, then accelerate's FSDP2 preparation shards the
    model and swaps the optimizer's parameters for DTensors (``Accelerator._prepare_fsdp2``:
    ``fsdp2_prepare_model``, then ``fsdp2_switch_optimizer_parameters``).

    accelerate (1.16) turns FSDP on only for accelerator devices: ``AcceleratorState`` sets
    ``DistributedType.FSDP`` only inside its branch for MULTI_GPU/MLU/NPU/XPU/… (accelerate/state.py),
    never for MULTI_CPU. So this sets the state's distributed type to FSDP by hand; everything after
    it — the preparation, the swap, ``accelerator.backward`` — is accelerate's own code."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        from torch.distributed.tensor import DTensor

        results = {}
        data = torch.randint(0, 64, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
        per_rank = BATCH // world
        for case in HF_CASES:
            plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2,
                auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                reshard_after_forward=True,
                state_dict_type="SHARDED_STATE_DICT",
                cpu_ram_efficient_loading=False,
            )
            accelerator = Accelerator(fsdp_plugin=plugin)
            accelerator.state.distributed_type = DistributedType.FSDP  # see the docstring
            accelerator.state.fsdp_plugin = plugin
            model, optimizer = _hf_model_and_optimizer(case)
            model, optimizer = accelerator.prepare(model, optimizer)
            swapped = all(isinstance(p, DTensor) for g in optimizer.optimizer.param_groups for p in g["params"])
            _hf_train(model, optimizer, data[rank * per_rank : (rank + 1) * per_rank], accelerator.backward)
            with torch.no_grad():
                final = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
            if rank == 0:
                ref, ref_optimizer = _hf_model_and_optimizer(case)
                _hf_train(ref, ref_optimizer, data, lambda loss: loss.backward())
                results[case] = {"swapped": swapped, "worst": worst_relative(ref.state_dict(), final)}
            accelerator.free_memory()
        if rank == 0:
            Path(folder, "hf.json").write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch_hf(world: int, folder: Path) -> dict:
    mp.spawn(_hf_worker, args=(world, free_port(), str(folder)), nprocs=world, join=True)
    return json.loads((folder / "hf.json").read_text())
