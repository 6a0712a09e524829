"""Building a Llama without a full-precision copy, activation checkpointing, streamed weights,
--vocab-size, the memory preflight, and compact optimizer state everywhere it was asked for."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from galorex.memory import activation_bytes, estimate_optimizer_state_bytes, training_memory_breakdown
from galorex.models.llama import Llama, build_llama, get_config
from galorex.optim.factory import build_optimizer
from galorex.train.checkpoint import (
    CheckpointError,
    load_safetensors_into,
    save_safetensors,
)
from galorex.train.cli import main

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
TINY = ["--model", "llama-tiny", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]
TINY += ["--sample-tokens", "0", "--save-every", "0", "--eval-every", "0", "--threads", "1"]

pytestmark = pytest.mark.usefixtures("restore_torch_globals", "single_thread")


def _tokens(vocab: int, batch: int = 2, length: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (a process's peak memory only grows) and parse the JSON
    it prints last."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- construction -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_build_llama_is_deterministic_in_its_dtype_and_initialised_like_the_model(dtype):
    cfg = get_config("llama-tiny")
    a = build_llama(cfg, dtype=dtype, seed=3)
    b = build_llama(cfg, dtype=dtype, seed=3)
    c = build_llama(cfg, dtype=dtype, seed=4)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert p.dtype == dtype and p.device.type == "cpu", name
        assert torch.equal(p, q), name
        if "norm" not in name:
            assert not torch.equal(p, r), name
    # The rotary tables are rebuilt in float32 wherever the model lands.
    assert a.rotary.cos.dtype == torch.float32
    torch.testing.assert_close(a.rotary.cos, Llama(cfg).rotary.cos, rtol=0, atol=0)
    # Init_weights' distributions: norms are ones, the residual writers have std/√(2L).
    assert all(torch.equal(blk.attn_norm.weight, torch.ones_like(blk.attn_norm.weight)) for blk in a.layers)
    big = build_llama(get_config("llama-60m"), dtype=dtype, seed=0)
    std, out_std = 0.02, 0.02 / (2 * 8) ** 0.5
    n = big.embed.weight.numel()
    # A sample std of n normals is within 5 standard errors (σ·√(1/(2n))) of σ, plus bf16 rounding.
    tol = 5 / (2 * n) ** 0.5 + (2**-8 if dtype == torch.bfloat16 else 0)
    assert abs(float(big.embed.weight.detach().float().std()) / std - 1) < tol
    o = big.layers[0].attn.o_proj.weight.detach().float()
    assert abs(float(o.std()) / out_std - 1) < 5 / (2 * o.numel()) ** 0.5 + (2**-8 if dtype == torch.bfloat16 else 0)
    _, loss = a(_tokens(cfg.vocab_size)[:, :-1], _tokens(cfg.vocab_size)[:, 1:])
    assert torch.isfinite(loss)


def test_build_llama_reties_a_tied_head_and_leaves_no_meta_tensor():
    cfg = dataclasses.replace(get_config("llama-tiny"), tie_embeddings=True)
    model = build_llama(cfg, dtype=torch.bfloat16, seed=0)
    assert model.lm_head.weight is model.embed.weight
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.num_parameters() == Llama(cfg).num_parameters()


def test_construction_peak_is_the_weights_not_a_float32_copy():
    """llama-130m in bf16 (0.25 GiB of weights): the process's peak while building is at most
    1.1× the weights + 0.5 GiB (the issue's bound, the interpreter and torch included), and what
    building adds to the process is the weights plus one piece's workspace (the 32000×768
    embedding's float32 normal draw, 94 MiB, at most), far from the float32 model (0.5 GiB)
    that building then casting would hold."""
    r = _run_python(
        """
        import json, torch
        from galorex.models.llama import build_llama, get_config
        from galorex.train.trainer import _peak_memory_bytes  # VmHWM: this process's own peak
        torch.set_num_threads(1)
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        before = rss()
        m = build_llama(get_config("llama-130m"), dtype=torch.bfloat16, seed=0)
        weights = sum(p.numel() * p.element_size() for p in m.parameters())
        peak = _peak_memory_bytes(torch.device("cpu"))
        print(json.dumps({"before": before, "peak": peak, "weights": weights}))
        """
    )
    assert r["peak"] <= 1.1 * r["weights"] + 0.5 * GIB, r
    embed_f32 = 32000 * 768 * 4
    assert r["peak"] - r["before"] <= r["weights"] + embed_f32 + 32 * 2**20, r


# --- activation checkpointing ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_checkpointing_gives_the_same_gradients_bit_for_bit(dtype):
    """Recomputing a block replays the same CPU kernels on the same inputs, so the gradients are
    identical, not merely close (float32 and bf16)."""
    cfg = get_config("llama-tiny")  # grouped-query attention: 4 heads, 2 kv heads
    x = _tokens(cfg.vocab_size, length=33)
    grads = []
    for checkpointing in (False, True):
        model = build_llama(cfg, dtype=dtype, seed=1, activation_checkpointing=checkpointing)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


def test_activation_checkpointing_with_layerwise_steps_the_same_weights():
    cfg = get_config("llama-tiny")
    x = _tokens(cfg.vocab_size, length=33)
    weights = []
    for checkpointing in (False, True):
        model = build_llama(cfg, seed=2, activation_checkpointing=checkpointing)
        opt = build_optimizer("galore", model, lr=1e-2, rank=8, update_proj_gap=2, layerwise=True, optim_bits=8)
        for _ in range(3):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()  # steps every parameter
            opt.step()
            opt.zero_grad(set_to_none=True)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_activation_checkpointing_keeps_less_for_backward():
    cfg = get_config("llama-60m")
    plain = activation_bytes(cfg, 2, 128, torch.float32, False)
    ckpt = activation_bytes(cfg, 2, 128, torch.float32, True)
    # Each of the 8 blocks keeps its input (2×128×512 float32) instead of all its activations.
    assert ckpt < plain / 2


def test_activation_count_is_what_autograd_saves_on_the_cpu():
    """The count (fake tensors, 1 and 2 blocks scaled to num_layers) against the storages a real
    CPU forward saves, counted the same way: within the rotary tables' bytes (the fake run sees
    separate storages for the float32 cos/sin slices, 2·T·head_dim·4 bytes)."""
    from torch.autograd.graph import saved_tensors_hooks

    cfg = get_config("llama-tiny")
    model = build_llama(cfg, seed=0)
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = _tokens(cfg.vocab_size, batch=2, length=65)
    with saved_tensors_hooks(pack, lambda t: t):
        model(x[:, :-1], x[:, 1:])
    real = sum(seen.values())
    counted = activation_bytes(cfg, 2, 64, torch.float32, False)
    assert abs(counted - real) <= 2 * 64 * cfg.head_dim * 4, (counted, real)


# --- --vocab-size ------------------------------------------------------------------------------


def test_vocab_size_sets_the_embedding_and_must_hold_the_tokenizer(tmp_path, capsys):
    assert main(TINY + ["--steps", "1", "--vocab-size", "300", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 300 and cfg["train"]["vocab_size"] == 300
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    with torch.device("meta"):
        assert summary["parameters"] == Llama(get_config("llama-tiny", vocab_size=300)).num_parameters()
    rc = main(TINY + ["--steps", "1", "--vocab-size", "200", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "--vocab-size 200" in err and "256 tokens" in err and "--vocab-size 256" in err
    assert not (tmp_path / "b").exists()
    rc = main(TINY + ["--steps", "1", "--vocab-size", "0", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and "--vocab-size 0" in err and "vocab_size must be a positive int" in err


def test_the_model_follows_a_larger_tokenizer_and_resume_checks_it(tmp_path, capsys):
    """--tokenizer with more tokens than the preset and no --vocab-size: the embedding takes the
    tokenizer's size rounded up to a multiple of 64, one line says so, summary.json and the
    checkpoint record it, and a resume asking for another size is refused."""
    from galorex.train.data import default_corpus_path

    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "--data", str(default_corpus_path()), "--vocab-size", "300", "--out", str(tok)]) == 0
    capsys.readouterr()
    run = [
        "--tokenizer",
        str(tok),
        "--steps",
        "2",
        "--save-every",
        "2",
        "--eval-every",
        "0",
        "--out",
        str(tmp_path / "a"),
    ]
    assert main(TINY + run) == 0
    out = capsys.readouterr().out
    assert out.count("vocabulary: 320 (the tokenizer's 300 tokens rounded up to a multiple of 64") == 1
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["vocab_size"] == 320
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "ckpt-00000002.pt", weights_only=True)
    assert ckpt["model_config"]["vocab_size"] == 320 and ckpt["model"]["embed.weight"].shape == (320, 128)
    assert main(TINY + run[:-4] + ["--steps", "4", "--eval-every", "0", "--out", str(tmp_path / "a"), "--resume"]) == 0
    capsys.readouterr()
    rc = main(TINY + run + ["--resume", "--vocab-size", "384"])
    assert rc == 2 and "vocab_size" in capsys.readouterr().err


# --- streamed weights --------------------------------------------------------------------------


def test_safetensors_written_one_tensor_at_a_time_read_by_the_library_and_back(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g).bfloat16(),
        "b": torch.randn(7, generator=g).double(),
        "i": torch.arange(10, dtype=torch.int32),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }
    save_safetensors(tensors, tmp_path / "x.safetensors")
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "y.safetensors"))
    into = {k: torch.empty_like(v) for k, v in tensors.items()}
    load_safetensors_into(into, tmp_path / "y.safetensors")
    assert all(torch.equal(into[k], v) for k, v in tensors.items())
    # Another dtype: read through the bounded buffer and cast, as copy_ casts.
    into = {k: torch.empty(v.shape, dtype=torch.float64) for k, v in tensors.items()}
    load_safetensors_into(into, tmp_path / "x.safetensors")
    assert all(torch.equal(into[k], v.double()) for k, v in tensors.items())


def test_safetensors_bad_files_and_mismatches_are_named(tmp_path):
    save_safetensors({"w": torch.ones(4, 4)}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*w has shape \(4, 4\), the model needs \(2, 8\)"):
        load_safetensors_into({"w": torch.empty(2, 8)}, tmp_path / "w.safetensors", what="the model")
    with pytest.raises(CheckpointError, match="missing \\['v'\\], unexpected \\['w'\\]"):
        load_safetensors_into({"v": torch.empty(4, 4)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="cut.safetensors: entry 'w' does not fit the file"):
        load_safetensors_into({"w": torch.empty(4, 4)}, tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
    with pytest.raises(CheckpointError, match="junk.safetensors: cannot read it, not a safetensors file"):
        load_safetensors_into({"w": torch.empty(4, 4)}, tmp_path / "junk.safetensors")


def test_a_failed_save_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    from galorex.train import checkpoint

    path = tmp_path / "model.safetensors"
    save_safetensors({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    calls = []

    def failing(t):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return memoryview(t.reshape(-1).view(torch.uint8).numpy())

    monkeypatch.setattr(checkpoint, "_byte_view", failing)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"a": torch.zeros(3), "b": torch.zeros(5)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_saving_and_loading_weights_needs_no_copy_of_them():
    """llama-60m in float32 (221 MiB): the trainer's final save and --init-from's load each add
    at most one tensor (the 62.5 MiB embedding) and a few MiB to the process's peak; the earlier
    save cloned every tensor (+221 MiB)."""
    r = _run_python(
        """
        import json, tempfile, torch
        from pathlib import Path
        from galorex.models.llama import build_llama, get_config
        from galorex.train.trainer import _save_weights, _load_initial_weights, _peak_memory_bytes
        torch.set_num_threads(1)
        def peak():
            return _peak_memory_bytes(torch.device("cpu"))
        def reset():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        m = build_llama(get_config("llama-60m"), seed=0)
        out = Path(tempfile.mkdtemp())
        reset(); base = peak()
        path = _save_weights(m.state_dict(), out)
        saved = peak() - base
        m2 = build_llama(get_config("llama-60m"), seed=1)  # initialised: its pages are resident
        reset(); base = peak()
        _load_initial_weights(m2, str(path))
        loaded = peak() - base
        same = all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
        print(json.dumps({"saved": saved, "loaded": loaded, "same": same}))
        """
    )
    assert r["same"]
    embed = 32000 * 512 * 4
    assert r["saved"] <= embed + 16 * 2**20, r
    assert r["loaded"] <= 16 * 2**20, r  # read straight into the parameters


def test_init_from_loads_a_float32_file_into_a_bf16_model(tmp_path, capsys):
    a = tmp_path / "a"
    assert main(TINY + ["--steps", "1", "--out", str(a)]) == 0
    capsys.readouterr()
    b = tmp_path / "b"
    args = ["--steps", "0", "--dtype", "bf16", "--init-from", str(a / "model.safetensors"), "--out", str(b)]
    assert main(TINY + args) == 0
    capsys.readouterr()
    from safetensors.torch import load_file

    src, got = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.bfloat16()) for k, v in src.items())


# --- memory estimate and preflight -------------------------------------------------------------


def test_preflight_stops_before_building_and_names_estimate_available_and_fixes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GALOREX_AVAILABLE_MEMORY", "64MiB")
    out = tmp_path / "a"
    rc = main(TINY + ["--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    for needle in (
        "needs about",
        "more than the 0.1 GiB available (GALOREX_AVAILABLE_MEMORY)",
        "--layerwise (",
        "--force",
    ):
        assert needle in err, (needle, err)
    assert (
        "--optim-bits 8 (" in err and "--activation-checkpointing (" in err and "--batch-size 1 --grad-accum 2" in err
    )
    assert "--weight-bits 8 (" in err
    assert not out.exists()
    assert main(TINY + ["--steps", "1", "--out", str(out), "--force"]) == 0
    assert "--force: trying anyway" in capsys.readouterr().out
    monkeypatch.setenv("GALOREX_AVAILABLE_MEMORY", "lots")
    rc = main(TINY + ["--steps", "1", "--out", str(tmp_path / "b")])
    assert rc == 2 and "GALOREX_AVAILABLE_MEMORY='lots'" in capsys.readouterr().err


def test_preflight_estimate_goes_into_the_summary_and_its_state_is_exact(tmp_path, capsys):
    """The estimate the preflight checks, in summary.json: weights and optimizer state to the byte
    (the state once every parameter has stepped), beside the peaks at three points."""
    out = tmp_path / "a"
    args = ["--steps", "2", "--optim-bits", "8", "--basis-bits", "4", "--rank", "8", "--layerwise", "--out", str(out)]
    assert main(TINY + args) == 0
    capsys.readouterr()
    s = json.loads((out / "summary.json").read_text())
    est = s["memory_estimate"]
    with torch.device("meta"):
        n = Llama(get_config("llama-tiny")).num_parameters()
    assert est["weights"] == 4 * n
    assert est["optimizer_state"] == s["optimizer_state_bytes"]
    assert est["total"] == sum(v for k, v in est.items() if k != "total")
    mem = s["memory"]
    points = ("after_construction", "after_first_step", "after_last_step")
    rss = [mem[p]["cpu_max_rss"] for p in points]
    assert 0 < rss[0] <= rss[1] <= rss[2] <= s["peak_memory_bytes"]  # the end: evaluation, saving


def test_breakdown_parts_follow_the_flags():
    cfg = get_config("llama-60m")
    kw = dict(dtype=torch.bfloat16, rank=128, batch_size=2, seq_len=128)
    base = training_memory_breakdown(cfg, **kw)
    lw = training_memory_breakdown(cfg, layerwise=True, **kw)
    with torch.device("meta"):
        model = Llama(cfg)
    assert base["gradients"] == base["weights"] == 2 * model.num_parameters()
    assert lw["gradients"] == 2 * 32000 * 512  # the largest gradient: the embedding (and the head)
    eight = training_memory_breakdown(cfg, optim_bits=8, **kw)
    four = training_memory_breakdown(cfg, optim_bits=8, basis_bits=4, **kw)
    assert four["optimizer_state"] < eight["optimizer_state"] < base["optimizer_state"]
    ckpt = training_memory_breakdown(cfg, activation_checkpointing=True, **kw)
    assert ckpt["activations"] < base["activations"] and ckpt["weights"] == base["weights"]
    adamw = training_memory_breakdown(cfg, optimizer="adamw", **kw)
    assert adamw["optimizer_state"] == estimate_optimizer_state_bytes(model.to(torch.bfloat16), optimizer="adamw")


def test_breakdown_counts_int8_weights_as_the_built_model_holds_them():
    from galorex.weights import storage_bytes

    cfg = get_config("llama-tiny")
    kw = dict(dtype=torch.bfloat16, rank=8, batch_size=2, seq_len=32)
    plain = training_memory_breakdown(cfg, **kw)
    int8 = training_memory_breakdown(cfg, weight_bits=8, weight_group_size=64, **kw)
    model = build_llama(cfg, dtype=torch.bfloat16, seed=0, weight_bits=8, weight_group_size=64)
    assert int8["weights"] + int8["weight_scales"] == sum(storage_bytes(p) for p in model.parameters())
    assert int8["weight_scales"] == sum(4 * p.scales.numel() for p in model.parameters() if hasattr(p, "scales"))
    assert plain["weight_scales"] == 0
    assert plain["weights"] == sum(p.numel() * 2 for p in model.parameters())
    # The write's float32 working copy of a bf16 or INT8 weight is in the workspace either way.
    assert int8["step_workspace"] >= plain["step_workspace"]
    assert int8["gradients"] == plain["gradients"] and int8["optimizer_state"] == plain["optimizer_state"]


# --- compact optimizer state ------------------------------------------------------------------


def test_optim_bits_8_and_basis_bits_4_leave_no_large_float_state():
    """Every state tensor of 4096 entries or more (the 8-bit threshold) is 1-byte codes or packed
    4-bit codes: the embedding's and the head's Adam moments too, and every basis."""
    model = build_llama(get_config("llama-tiny"), dtype=torch.bfloat16, seed=0)
    opt = build_optimizer("galore", model, lr=1e-3, rank=16, optim_bits=8, basis_bits=4)
    x = _tokens(256, length=33)
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    checked = set()
    for p, state in opt.state.items():
        for key, value in state.items():
            if value.numel() >= 4096:
                assert value.dtype == torch.uint8, (names[id(p)], key, value.dtype)
                checked.add(names[id(p)])
        if names[id(p)] in ("embed.weight", "lm_head.weight"):
            assert {"exp_avg_q", "exp_avg_sq_q"} <= set(state), sorted(state)
    assert {"embed.weight", "lm_head.weight"} <= checked
    bases = [k for s in opt.state.values() for k in s if k.startswith("basis")]
    assert bases and all(k in ("basis_q4", "basis_scale") for k in bases), sorted(set(bases))
