"""GaLoreAdamW checkpoints: tensors-only state, weights_only loading, bit-exact resumption,
dtypes and devices of the restored state."""

from __future__ import annotations

import copy
import numbers

import pytest
import torch
from torch import nn

from galorex import GaLoreAdamW

pytestmark = pytest.mark.usefixtures("single_thread")

GAP = 5
TOTAL = 13  # refreshes at steps 0, 5, 10


from problems import conv_net_groups
from problems import make_conv_net as make_model


def make_opt(model, method="svd", policy="keep", proj_type="std"):
    return GaLoreAdamW(
        conv_net_groups(model, GAP, policy=policy, proj_type=proj_type, method=method),
        lr=1e-2,
        weight_decay=0.05,
    )


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 2, 5, 5, generator=g).to(dtype), torch.randn(8, 4, generator=g).to(dtype)


def train(model, opt, start, stop):
    first = next(model.parameters())
    for step in range(start, stop):
        x, y = (t.to(first.device) for t in batch(step, first.dtype))
        opt.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def check_plain(value, where="state"):
    """Only tensors, numbers, strings and None (inside dicts/lists/tuples)."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (torch.Tensor, numbers.Number, str)), (
            f"{where} holds a {type(value).__name__}"
        )


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_state_dict_holds_only_plain_values(method):
    model = make_model()
    opt = make_opt(model, method=method)
    train(model, opt, 0, 3)
    sd = opt.state_dict()
    assert len(sd["state"]) == len(list(model.parameters()))
    for pid, st in sd["state"].items():
        assert isinstance(pid, int)
        assert isinstance(st, dict) and st
        for k, v in st.items():
            assert isinstance(k, str)
            assert isinstance(v, torch.Tensor), (k, type(v))
    check_plain(sd["state"])
    check_plain(sd["param_groups"], "param_groups")
    # the same check is not vacuous: an object (e.g. a projector, as galore-torch stores) fails it
    with pytest.raises(AssertionError):
        check_plain({"projector": object()})


def _save_load(tmp_path, model, opt):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("resume_at", [GAP, GAP + 2], ids=["just-before-refresh", "mid-window"])
@pytest.mark.parametrize("policy", ["keep", "reproject", "reset"])
@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_resume_is_bit_exact(tmp_path, method, policy, resume_at):
    # uninterrupted
    ref_model = make_model()
    ref_opt = make_opt(ref_model, method, policy)
    train(ref_model, ref_opt, 0, TOTAL)

    # interrupted after `resume_at` steps; the next step (GAP) refreshes the basis
    model = make_model()
    opt = make_opt(model, method, policy)
    train(model, opt, 0, resume_at)
    ckpt = _save_load(tmp_path, model, opt)
    del model, opt

    fresh = make_model(seed=123)  # different init: the checkpoint must restore everything
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = make_opt(fresh, method, policy)
    fresh_opt.load_state_dict(ckpt["optim"])
    train(fresh, fresh_opt, resume_at, TOTAL)

    for (name, a), b in zip(fresh.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(fresh.parameters(), ref_model.parameters()):
        sa, sb = fresh_opt.state[a], ref_opt.state[b]
        assert set(sa) == set(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
            assert sa[k].dtype == sb[k].dtype, k
    # the resumed run crossed a refresh: the conv weight's basis changed after the checkpoint
    conv_w = fresh.conv.weight
    assert int(fresh_opt.state[conv_w]["proj_step"].item()) == 10
    basis_at_ckpt = ckpt["optim"]["state"][_param_id(fresh_opt, conv_w)]["basis"]
    assert not torch.equal(fresh_opt.state[conv_w]["basis"], basis_at_ckpt)


def test_resume_with_named_groups_from_galore_param_groups(tmp_path):
    from galorex import galore_param_groups

    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential()
        model.add_module("attn", nn.Linear(6, 10))
        model.add_module("act", nn.Tanh())
        model.add_module("mlp", nn.Linear(10, 4))
        opt = GaLoreAdamW(
            galore_param_groups(model, rank=2, update_proj_gap=3, moment_policy="reproject", weight_decay=0.1), lr=1e-2
        )
        return model, opt

    def run(model, opt, start, stop):
        for step in range(start, stop):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    ref, ref_opt = build(0)
    run(ref, ref_opt, 0, 8)
    model, opt = build(0)
    run(model, opt, 0, 3)
    ckpt = _save_load(tmp_path, model, opt)
    assert ckpt["optim"]["param_groups"][1]["param_names"] == ["attn.weight", "mlp.weight"]
    fresh, fresh_opt = build(1)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["optim"])
    assert fresh_opt.param_groups[1]["param_names"] == ["attn.weight", "mlp.weight"]
    run(fresh, fresh_opt, 3, 8)
    for a, b in zip(fresh.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def _param_id(opt, p):
    i = 0
    for g in opt.param_groups:
        for q in g["params"]:
            if q is p:
                return i
            i += 1
    raise KeyError


def test_resume_differs_if_state_is_not_loaded(tmp_path):
    """Control for the bit-exact test: a fresh optimizer without the state does not match."""
    ref_model = make_model()
    ref_opt = make_opt(ref_model)
    train(ref_model, ref_opt, 0, TOTAL)
    model = make_model()
    opt = make_opt(model)
    train(model, opt, 0, GAP + 2)
    fresh_opt = make_opt(model)
    train(model, fresh_opt, GAP + 2, TOTAL)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


def test_loaded_state_is_independent_of_the_source():
    model = make_model()
    opt = make_opt(model, policy="reproject")
    train(model, opt, 0, 3)
    sd = opt.state_dict()
    snapshot = {pid: {k: v.clone() for k, v in st.items()} for pid, st in sd["state"].items()}
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    twin_opt = make_opt(twin, policy="reproject")
    twin_opt.load_state_dict(sd)
    train(twin, twin_opt, 3, 7)
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, snapshot[pid][k]), (pid, k)


def _projected(opt):
    return [p for g in opt.param_groups if g.get("rank") is not None for p in g["params"] if p.dim() >= 2]


def _dense(opt):
    proj = {id(p) for p in _projected(opt)}
    return [p for g in opt.param_groups for p in g["params"] if id(p) not in proj]


def _assert_bf16_state_dtypes(opt):
    for p in _projected(opt):
        st = opt.state[p]
        for k in ("basis", "exp_avg", "exp_avg_sq"):
            assert st[k].dtype == torch.float32, k
        assert st["step"].dtype == torch.float32
    for p in _dense(opt):
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.bfloat16
        assert st["exp_avg_sq"].dtype == torch.bfloat16
        assert st["step"].dtype == torch.float32


@pytest.mark.parametrize("policy", ["keep", "reproject"])
def test_bf16_model_keeps_float32_subspace_state(tmp_path, policy):
    model = make_model(dtype=torch.bfloat16)
    opt = make_opt(model, policy=policy)
    train(model, opt, 0, 4)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    _assert_bf16_state_dtypes(opt)

    # what torch.optim's own load_state_dict would do is cast to bf16; galorex keeps float32
    ckpt = _save_load(tmp_path, model, opt)
    fresh = make_model(seed=9, dtype=torch.bfloat16)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = make_opt(fresh, policy=policy)
    fresh_opt.load_state_dict(ckpt["optim"])
    _assert_bf16_state_dtypes(fresh_opt)
    for a, b in zip(_projected(fresh_opt), _projected(opt)):
        assert torch.equal(fresh_opt.state[a]["basis"], opt.state[b]["basis"])

    train(model, opt, 4, 8)
    train(fresh, fresh_opt, 4, 8)
    _assert_bf16_state_dtypes(fresh_opt)
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_state_lands_on_the_parameter_device_cpu(tmp_path):
    model = make_model()
    opt = make_opt(model)
    train(model, opt, 0, 2)
    ckpt = _save_load(tmp_path, model, opt)
    fresh = make_model()
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = make_opt(fresh)
    fresh_opt.load_state_dict(ckpt["optim"])
    for p in fresh.parameters():
        for k, v in fresh_opt.state[p].items():
            assert v.device == p.device, k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_state_moves_to_cuda_on_load(tmp_path):
    model = make_model()
    opt = make_opt(model)
    train(model, opt, 0, GAP + 1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    cuda_model = make_model().cuda()
    cuda_model.load_state_dict(ckpt["model"])
    cuda_opt = make_opt(cuda_model)
    cuda_opt.load_state_dict(ckpt["optim"])
    proj = {id(p) for p in _projected(cuda_opt)}
    for p in cuda_model.parameters():
        for k, v in cuda_opt.state[p].items():
            if k in ("step", "proj_step") and id(p) in proj:
                # documented: step counters of projected parameters stay on the CPU
                assert v.device.type == "cpu", k
            elif k != "step":
                assert v.device == p.device, k
    train(cuda_model, cuda_opt, GAP + 1, GAP + 4)  # crosses nothing, but must run on CUDA
    train(model, opt, GAP + 1, GAP + 4)
    for a, b in zip(cuda_model.parameters(), model.parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


def test_float32_state_loads_into_a_bf16_model_and_steps():
    """Unprojected (AdamW) state follows torch's rule and is cast to its parameter's dtype;
    projected state keeps float32 — and the next step runs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Linear(20, 6))
    groups = [
        {"params": [model[0].bias, model[1].bias]},
        {"params": [model[0].weight, model[1].weight], "rank": 4, "update_proj_gap": 3},
    ]
    opt = GaLoreAdamW(groups, lr=1e-2)
    for _ in range(2):
        model(torch.randn(8, 12)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    groups16 = [
        {"params": [bf16[0].bias, bf16[1].bias]},
        {"params": [bf16[0].weight, bf16[1].weight], "rank": 4, "update_proj_gap": 3},
    ]
    opt16 = GaLoreAdamW(groups16, lr=1e-2)
    opt16.load_state_dict(saved)
    assert opt16.state[bf16[0].bias]["exp_avg"].dtype == torch.bfloat16
    assert opt16.state[bf16[0].weight]["exp_avg"].dtype == torch.float32
    assert opt16.state[bf16[0].weight]["basis"].dtype == torch.float32
    bf16(torch.randn(8, 12, dtype=torch.bfloat16)).float().square().mean().backward()
    opt16.step()
    assert all(torch.isfinite(p).all() for p in bf16.parameters())


def test_randomized_refresh_seeds_do_not_repeat_across_parameters_and_steps():
    from galorex.optim.base import _mix_seed

    seeds = {_mix_seed(0, index, step) for index in range(50) for step in range(0, 5000, 50)}
    assert len(seeds) == 50 * 100
    assert all(0 <= s < 2**63 for s in seeds)
