"""galorex under torch.distributed on the CPU (gloo): DDP and FSDP2 against one process on the same
global batch, identical bases on every rank, FSDP2's optimizer state split across ranks, sharded
(DCP) checkpoints resumed bit for bit after a rank died while writing the next one and resharded
between 2 and 4 ranks, every optimizer and state precision under FSDP2 (``fsdp2_support``),
layer-wise updates from FSDP2's post-backward, accelerate's FSDP2 preparation, and two "nodes" of
one process each under torchrun's c10d rendezvous.

Runs use float64 so that the comparison tests the maths rather than float32 rounding, which
GaLore can amplify: LAPACK's singular vectors may change sign under a 1e-16 change of G (seen on
llama-tiny's gradients), and with ``moment_policy="keep"`` a flipped basis vector meets moments of
the old sign. The runs here use ``reproject`` (which carries the sign through the transition
P_newᵀP_old) and rank 4, where the spectrum has a gap at r. They refresh on the staggered
schedule (half the matrices at odd steps, half at even ones), so the all-gathers of a refresh pair
up across ranks only if every rank derives the same phases. The model computes in float64 then
too (norms and loss included), so one process and the ranks differ by float64 rounding alone:
1e-9 relative bounds it with room (the runs measure 1e-16 to 1e-10).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import fsdp2_support as fsdp2
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from galorex.optim.factory import build_optimizer
from galorex.optim.sharded import local_state_bytes
from galorex.train.checkpoint import CheckpointError, list_checkpoints
from galorex.train.distributed import Context, list_sharded_checkpoints, load_extra
from galorex.train.trainer import TrainConfig, TrainError, _load_resume, train

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

WORLD = 2
ROOT = Path(__file__).resolve().parent.parent


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
    Path(result, f"rank{rank}.json").write_text(
        json.dumps({"state_bytes": local_state_bytes(opt), "same_bases": same, "bases": len(bases)})
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
    assert worst < 1e-9, worst
    # The same bases on every rank (DDP: from the all-reduced gradient; FSDP2: gathered).
    assert all(r["same_bases"] and r["bases"] == 28 for r in ranks)
    folder = Path(run.out) / "checkpoints"
    if mode == "fsdp2":
        ratios = [r["state_bytes"] / single_bytes for r in ranks]
        print(f"FSDP2 per-rank optimizer state / single process: {ratios} (single {single_bytes} B)")
        assert all(0.45 < x < 0.55 for x in ratios), ratios
        assert [s for s, _ in list_sharded_checkpoints(folder)] == [2, 4, 6]
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
    assert worst < 1e-9, worst
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
    if not dist.is_initialized() and "RANK" not in os.environ:
        with pytest.raises(TrainError, match="torchrun"):
            train(_config(tmp_path, "y", distributed="fsdp2"))
    with pytest.raises(TrainError, match="--distributed"):
        train(_config(tmp_path, "z", distributed="horovod"))


def _fsdp2_run(single) -> TrainConfig:
    """The 2-rank FSDP2 run of test_matches_single_process_on_the_same_global_batch (made here
    when that test did not run first): checkpoints at steps 2, 4 and 6."""
    tmp, _, _ = single
    full = _config(tmp, "fsdp2", distributed="fsdp2", save_every=2)
    if not (Path(full.out) / "model.safetensors").exists():
        _spawn(full, tmp / "fsdp2-result")
    return full


def test_fsdp2_resume_with_other_settings_or_a_missing_shard_is_refused(single, tmp_path):
    """As in one process, a sharded checkpoint resumes only with the settings it was trained with;
    a checkpoint folder that lost a rank's shard file names it (checked before loading anything)."""
    full = _fsdp2_run(single)
    ctx = Context("fsdp2", 0, WORLD, 0)
    (_, latest), *_ = reversed(list_sharded_checkpoints(Path(full.out) / "checkpoints"))
    saved = load_extra(ctx, latest)["config"]  # as train() filled it in (lr, scale)
    _load_resume(TrainConfig(**{**saved, "resume": "latest"}), Path(full.out), ctx)  # the same settings load
    for change, key in ((dict(optimizer="fira"), "optimizer"), (dict(optim_bits=8), "optim_bits")):
        other = TrainConfig(**{**saved, "resume": "latest", **change})
        with pytest.raises(TrainError, match=f"was trained with {key}="):
            _load_resume(other, Path(full.out), ctx)
    broken = tmp_path / latest.name
    shutil.copytree(latest, broken)
    (broken / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"missing shard file\(s\) __1_0\.distcp of 2"):
        load_extra(ctx, broken)


# ----------------------------------------------------------------------------- every optimizer
@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    """fsdp2_support's cases on llama-tiny and on the odd-sized model over 2 ranks (the odd one
    checkpointing at step 3), on the odd-sized model over 4 ranks resumed from the 2-rank checkpoints
    (and checkpointing itself), and over 2 ranks again resumed from those: three launches."""
    folder = tmp_path_factory.mktemp("fsdp2-cases")
    tiny, odd, reshard = fsdp2.TINY_CASES, fsdp2.CASES, fsdp2.RESHARD_CASES
    results = {2: fsdp2.launch(2, [("straight", "llama-tiny", tiny), ("straight+save", "odd", odd)], folder)}
    results[4] = fsdp2.launch(4, [("straight+save", "odd", reshard), ("resume-from-2", "odd", reshard)], folder)
    fsdp2.launch(2, [("resume-from-4", "odd", reshard)], folder)
    return folder, results


@pytest.mark.parametrize("model, world", [("llama-tiny", 2), ("odd", 2), ("odd", 4)])
def test_fsdp2_every_optimizer_and_precision_matches_one_process(fsdp2_runs, model, world):
    """Within 1e-9 of one process (float64), or — where one process is farther than that from itself
    with the batch summed in the ranks' slices (proj_type="full": Adam's first steps amplify the
    rounding of a 4×4 core's small entries) — within 4 times that floor."""
    folder, results = fsdp2_runs
    job = "straight" if model == "llama-tiny" else "straight+save"
    for case, result in results[world][(job, model)].items():
        sharded = fsdp2.load(folder, model, case, f"{world}-straight")
        worst = fsdp2.worst_relative(fsdp2.load(folder, model, case, "1"), sharded)
        assert worst < max(1e-9, 4 * result["floor"]), (case, worst, result["floor"])


def test_fsdp2_each_rank_holds_its_share_of_the_state(fsdp2_runs):
    """Per rank, within 2 % of half of one process's optimizer state, for every case on llama-tiny
    (uneven splits and whole 8-bit blocks make up the 2 %)."""
    _, results = fsdp2_runs
    for case, result in results[WORLD][("straight", "llama-tiny")].items():
        ratios = [b / result["single_state_bytes"] for b in result["state_bytes"]]
        assert all(abs(r * WORLD - 1) < 0.02 for r in ratios), (case, ratios)


@pytest.mark.parametrize("source, world", [(2, 4), (4, 2)])
def test_fsdp2_checkpoint_reshards_to_another_world_size(fsdp2_runs, source, world):
    """A step-3 checkpoint of `source` ranks resumed on `world` ranks ends where the straight
    `source`-rank run ends, for every optimizer and precision: the state is resharded (on the odd-sized model
    the 8-bit embedding moves between being stepped by rows on 2 ranks and whole on 4)."""
    folder, _ = fsdp2_runs
    for case in fsdp2.RESHARD_CASES:
        straight = fsdp2.load(folder, "odd", case, f"{source}-straight")
        resumed = fsdp2.load(folder, "odd", case, f"{world}-resume-from-{source}")
        worst = fsdp2.worst_relative(straight, resumed)
        assert worst < 1e-9, (case, worst)


def test_fsdp2_through_accelerate_keeps_an_optimizer_built_before_it(tmp_path):
    """An optimizer built on the plain model keeps working after accelerate's FSDP2 preparation
    swapped its parameters for DTensors (fsdp2_support._hf_worker says how accelerate is brought to
    FSDP on the CPU)."""
    pytest.importorskip("transformers", reason="install the [hf] extra (transformers, accelerate)")
    pytest.importorskip("accelerate", reason="install the [hf] extra (transformers, accelerate)")
    results = fsdp2.launch_hf(WORLD, tmp_path)
    for case, result in results.items():
        assert result["swapped"], case
        assert result["worst"] < 1e-9, (case, result["worst"])


def test_two_nodes_under_the_c10d_rendezvous_with_layerwise_8bit_fsdp2(single, tmp_path):
    """`torchrun --nnodes 2 --rdzv-backend c10d` twice on localhost, one process each (two "nodes"),
    galorex-train --distributed fsdp2 --layerwise with 8-bit moments and 4-bit bases: every
    parameter stepped from FSDP2's post-backward; against one process with the same settings."""
    tmp, _, _ = single
    common = dict(grad_clip=0.0, optim_bits=8, basis_bits=4, steps=4)
    ref = _config(tmp, "single-8bit", **common)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        train(ref, log=lambda *a, **k: None)
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    run = _config(tmp_path, "nodes", distributed="fsdp2", layerwise=True, **common)
    flags = ["--model", "llama-tiny", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1"]
    flags += ["--eval-every", "0", "--sample-tokens", "0", "--no-progress", "--threads", "1", "--steps", "4"]
    flags += ["--warmup", "2", "--rank", "4", "--update-proj-gap", "2", "--moment-policy", "reproject"]
    flags += ["--dtype", "fp64", "--save-every", "0", "--grad-clip", "0", "--optim-bits", "8", "--basis-bits", "4"]
    flags += ["--distributed", "fsdp2", "--layerwise", "--out", run.out, "--cache-dir", ref.cache_dir]
    port = fsdp2.free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env["OMP_NUM_THREADS"] = "1"
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    rendezvous += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "galorex-nodes"]
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "-m", "galorex.train", *flags]
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0].decode(errors="replace") for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    worst = _worst_relative(_weights(ref.out), _weights(run.out))
    assert worst < 1e-9, worst
