"""galorex-train under torch.distributed on the CPU (gloo, 2 processes): DDP and FSDP2 against one
process on the same global batch, identical bases on every rank, FSDP2's optimizer state split
across ranks, a sharded (DCP) checkpoint resumed bit for bit after a rank died while writing the
next one.

Runs use float64 so that the comparison tests the maths rather than float32 rounding, which
GaLore can amplify: LAPACK's singular vectors may change sign under a 1e-16 change of G (seen on
llama-tiny's gradients), and with ``moment_policy="keep"`` a flipped basis vector meets moments of
the old sign. The runs here use ``reproject`` (which carries the sign through the transition
P_newᵀP_old) and rank 4, where the spectrum has a gap at r. They refresh on the staggered
schedule (half the matrices at odd steps, half at even ones), so the all-gathers of a refresh pair
up across ranks only if every rank derives the same phases.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from galorex.optim.factory import build_optimizer
from galorex.optim.sharded import local_state_bytes
from galorex.train.checkpoint import list_checkpoints
from galorex.train.distributed import list_sharded_checkpoints
from galorex.train.trainer import TrainConfig, TrainError, train

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

WORLD = 2


def _config(tmp: Path, name: str, **changes) -> TrainConfig:
    base = dict(
        model="llama-tiny",
        batch_size=4,
        seq_len=32,
        eval_batches=1,
        eval_every=0,
        sample_tokens=0,
        progress=False,
        threads=1,
        steps=6,
        warmup=2,
        rank=4,
        update_proj_gap=2,
        refresh_schedule="staggered",
        moment_policy="reproject",
        dtype="fp64",
        save_every=0,
        log_every=1,
        cache_dir=str(tmp / "cache"),
        out=str(tmp / name),
    )
    base.update(changes)
    return TrainConfig(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bases(opt) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = []
    for state in opt.state.values():
        if "basis" in state:
            b = state["basis"]
            out.append(b.full_tensor() if isinstance(b, DTensor) else b)
    return out


def _worker(rank: int, port: int, cfg: dict, result: str, die_at: int | None) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if die_at is not None and rank == 1:
        import torch.distributed.checkpoint as dcp

        save = dcp.save

        def save_then_die(state, checkpoint_id, **kw):
            save(state, checkpoint_id=checkpoint_id, **kw)
            if f"{die_at:08d}" in str(checkpoint_id):
                os._exit(3)  # killed after writing its shards, before the folder is complete

        dcp.save = save_then_die
    captured = {}

    def make(name, model, **options):
        captured["opt"] = build_optimizer(name, model, **options)
        return captured["opt"]

    train(TrainConfig(**cfg), log=lambda *a, **k: None, make_optimizer=make)
    opt = captured["opt"]
    bases = _bases(opt)
    flat = torch.cat([b.reshape(-1) for b in bases])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    uneven = _uneven_check(rank) if cfg["distributed"] == "fsdp2" and die_at is None else None
    Path(result, f"rank{rank}.json").write_text(
        json.dumps({"state_bytes": local_state_bytes(opt), "same_bases": same, "bases": len(bases), "uneven": uneven})
    )
    dist.barrier()  # rank 0 hosts the store: nobody leaves while another still needs it
    dist.destroy_process_group()


def _spawn(cfg: TrainConfig, result: Path, die_at: int | None = None) -> list[dict]:
    result.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(_free_port(), cfg.to_dict(), str(result), die_at), nprocs=WORLD, join=True)
    return [json.loads((result / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _weights(out: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


def _worst_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    captured = {}

    def make(name, model, **options):
        captured["opt"] = build_optimizer(name, model, **options)
        return captured["opt"]

    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        cfg = _config(tmp, "single")
        train(cfg, log=lambda *a, **k: None, make_optimizer=make)
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    return tmp, cfg, local_state_bytes(captured["opt"])


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_matches_single_process_on_the_same_global_batch(single, mode):
    tmp, cfg, single_bytes = single
    # 6 steps with update_proj_gap=2 (staggered: refreshes at every step); checkpoints at 2, 4, 6.
    run = _config(tmp, mode, distributed=mode, save_every=2)
    ranks = _spawn(run, tmp / f"{mode}-result")
    worst = _worst_relative(_weights(cfg.out), _weights(run.out))
    assert worst < 1e-5, worst
    # The same bases on every rank (DDP: from the all-reduced gradient; FSDP2: gathered).
    assert all(r["same_bases"] and r["bases"] == 28 for r in ranks)
    folder = Path(run.out) / "checkpoints"
    if mode == "fsdp2":
        ratios = [r["state_bytes"] / single_bytes for r in ranks]
        print(f"FSDP2 per-rank optimizer state / single process: {ratios} (single {single_bytes} B)")
        assert all(0.45 < x < 0.55 for x in ratios), ratios
        assert [s for s, _ in list_sharded_checkpoints(folder)] == [2, 4, 6]
        # Odd sizes too (see _uneven_check): unequal shards on both sides match one process.
        assert all(v < 1e-12 for v in ranks[0]["uneven"].values()), ranks[0]["uneven"]
    else:
        assert all(r["state_bytes"] == single_bytes for r in ranks)
        assert [s for s, _ in list_checkpoints(folder)] == [2, 4, 6]  # one file, from rank 0


def test_ddp_layerwise_matches_single_process(single):
    """--distributed ddp --layerwise: each gradient averaged over the ranks in its hook, then
    stepped and freed; with --grad-accum 2 (global batch 2 per backward, 4 per step)."""
    tmp, _, _ = single
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        ref = _config(tmp, "single-noclip", grad_clip=0.0, save_every=0)
        train(ref, log=lambda *a, **k: None)
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    run = _config(
        tmp, "ddp-layerwise", distributed="ddp", layerwise=True, grad_clip=0.0, batch_size=2, grad_accum=2, save_every=3
    )
    ranks = _spawn(run, tmp / "ddp-layerwise-result")
    worst = _worst_relative(_weights(ref.out), _weights(run.out))
    assert worst < 1e-5, worst
    assert all(r["same_bases"] and r["bases"] == 28 for r in ranks)
    assert [s for s, _ in list_checkpoints(Path(run.out) / "checkpoints")] == [3, 6]


def test_fsdp2_checkpoint_survives_a_dead_rank_and_resumes_bit_for_bit(single):
    tmp, _, _ = single
    full = _config(tmp, "fsdp2", distributed="fsdp2", save_every=2)
    if not (Path(full.out) / "model.safetensors").exists():  # run alone: make the reference run
        _spawn(full, tmp / "fsdp2-result")
    crashed = _config(tmp, "fsdp2-crash", distributed="fsdp2", save_every=2)
    with pytest.raises(ProcessException):  # the dead rank, or rank 0 aborted by gloo
        _spawn(crashed, tmp / "crash-result", die_at=4)
    folder = Path(crashed.out) / "checkpoints"
    # Step 4's folder never became a checkpoint; step 2's is complete and loads.
    assert [s for s, _ in list_sharded_checkpoints(folder)] == [2]
    assert any(p.name.startswith(".ckpt-00000004") for p in folder.iterdir())
    resumed = _config(tmp, "fsdp2-crash", distributed="fsdp2", save_every=2, resume="latest")
    _spawn(resumed, tmp / "resume-result")
    a, b = _weights(full.out), _weights(resumed.out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in list_sharded_checkpoints(folder)] == [2, 4, 6]
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())


def test_refusals(tmp_path):
    with pytest.raises(TrainError, match="--layerwise with --distributed fsdp2"):
        train(_config(tmp_path, "x", distributed="fsdp2", layerwise=True))
    if not dist.is_initialized() and "RANK" not in os.environ:
        with pytest.raises(TrainError, match="torchrun"):
            train(_config(tmp_path, "y", distributed="fsdp2"))
    with pytest.raises(TrainError, match="--distributed"):
        train(_config(tmp_path, "z", distributed="horovod"))


def _uneven_check(rank: int) -> dict[str, float]:
    """Odd sizes (5, 9, 3 rows; 7, 5, 9 columns) over 2 ranks: unequal shards of W, of the moments
    and of the bases, on the left and the right side, against the same steps in one process."""
    from torch.distributed.fsdp import fully_shard

    from galorex.optim import GaLoreAdamW

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)
        ).double()

    def groups(m, proj_type):
        return [
            {
                "params": [m[0].weight, m[2].weight, m[4].weight],
                "rank": 2,
                "update_proj_gap": 2,
                "moment_policy": "reproject",
                "proj_type": proj_type,
            },
            {"params": [m[0].bias, m[2].bias, m[4].bias]},
        ]

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 7, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 3, generator=gen, dtype=torch.float64)

    def run(m, opt, rows):
        for _ in range(5):
            (m(x[rows]) - y[rows]).square().mean().backward()
            opt.step()
            opt.zero_grad()

    worst = {}
    for proj_type in ("left", "right", "std"):
        ref = make()
        run(ref, GaLoreAdamW(groups(ref, proj_type), lr=1e-2), slice(0, 8))
        m = make()
        for layer in (m[0], m[2], m[4]):
            fully_shard(layer)
        fully_shard(m)
        run(m, GaLoreAdamW(groups(m, proj_type), lr=1e-2), slice(4 * rank, 4 * rank + 4))
        with torch.no_grad():
            worst[proj_type] = max(
                float((a.full_tensor() - b).norm() / b.norm()) for a, b in zip(m.parameters(), ref.parameters())
            )
    return worst
