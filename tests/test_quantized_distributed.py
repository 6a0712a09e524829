"""INT8 weights under DDP (gloo, 2 processes): every rank holds the same codes at the end — the
stochastic rounding's draws are seeded by parameter and step, not by rank, and every rank rounds the
same averaged gradient — with and without --layerwise (each gradient averaged in its hook).

Against one process the codes are not compared: averaging over ranks changes the gradient in its
last bits, a draw within that distance of a value's fraction rounds the other way (about one code a
step in llama-tiny), and at GaLore's learning rate the runs then drift apart like any two chaotic
trajectories (a few percent after 4 steps, measured while writing this test)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from galorex.train.trainer import TrainConfig, train

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

WORLD = 2


def _config(out: Path, **changes) -> dict:
    base = dict(
        model="llama-tiny",
        batch_size=4,
        seq_len=32,
        eval_batches=1,
        eval_every=0,
        sample_tokens=0,
        progress=False,
        threads=1,
        steps=4,
        warmup=2,
        rank=4,
        update_proj_gap=2,
        moment_policy="reproject",
        save_every=0,
        weight_bits=8,
        weight_group_size=64,
        out=str(out),
        cache_dir=str(out.parent / "cache"),
    )
    base.update(changes)
    return base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cfg: dict, result: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    models = {}

    def make(name, model, **options):
        from galorex.optim.factory import build_optimizer

        models["model"] = model
        return build_optimizer(name, model, **options)

    train(TrainConfig(**cfg), log=lambda *a, **k: None, make_optimizer=make)
    state = models["model"].state_dict()
    codes = torch.cat([t.reshape(-1).double() for k, t in state.items() if k.endswith(("_codes", "_scales"))])
    gathered = [torch.empty_like(codes) for _ in range(WORLD)]
    dist.all_gather(gathered, codes)
    Path(result, f"rank{rank}.json").write_text(json.dumps({"same": all(torch.equal(g, codes) for g in gathered)}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("layerwise", [False, True])
def test_ddp_ranks_hold_the_same_codes(tmp_path, layerwise):
    from safetensors.torch import load_file

    ddp = _config(tmp_path / "ddp", layerwise=layerwise, distributed="ddp")
    (tmp_path / "result").mkdir()
    mp.spawn(_worker, args=(_free_port(), ddp, str(tmp_path / "result")), nprocs=WORLD, join=True)
    assert all(json.loads((tmp_path / "result" / f"rank{r}.json").read_text())["same"] for r in range(WORLD))
    saved = load_file(tmp_path / "ddp" / "model.safetensors")
    assert sum(k.endswith("weight_codes") for k in saved) == 28
