"""Conventions every torch.optim optimizer keeps, held by every galorex optimizer: copy and pickle,
state dicts from older torch, the choice of AdamW implementation, torch's flags, tensor
hyperparameters of any 1-element shape, and AdamW's defaults."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

from galorex import GaLoreAdafactor, GaLoreAdamW, GradNormLoRPAdamW, NaturalGaLoreAdamW

pytestmark = pytest.mark.usefixtures("single_thread")

ADAM_FAMILY = [GaLoreAdamW, NaturalGaLoreAdamW, GradNormLoRPAdamW]
ALL = ADAM_FAMILY + [GaLoreAdafactor]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))


def _groups(model: nn.Module) -> list[dict]:
    return [
        {"params": [model[0].weight, model[2].weight], "rank": 3, "update_proj_gap": 2},
        {"params": [model[0].bias, model[2].bias]},
    ]


def _make(cls, model: nn.Module, **kw):
    if cls is GaLoreAdafactor:
        kw = {"lr": 1e-2, "relative_step": False, "scale_parameter": False, **kw}
    else:
        kw = {"lr": 1e-2, **kw}
    return cls(_groups(model), **kw)


def _batches(n: int = 5):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 10, generator=g), torch.randn(8, 6, generator=g)) for _ in range(n)]


def _train(model, opt, batches, layerwise=False):
    for x, y in batches:
        if not layerwise:
            opt.zero_grad(set_to_none=True)
        (model(x) - y).square().mean().backward()
        opt.step()


def _assert_same(a: nn.Module, b: nn.Module):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
}


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("layerwise", [False, True], ids=["normal", "layerwise"])
def test_a_copied_optimizer_steps_exactly_as_the_original(cls, how, layerwise):
    model = _model()
    opt = _make(cls, model, layerwise=layerwise)
    batches = _batches(6)
    _train(model, opt, batches[:3], layerwise)  # past a refresh (gap 2)
    twin_model, twin_opt = COPIES[how]((model, opt))  # together, so the copy's params are its model's
    assert twin_opt.param_groups[0]["params"][0] is twin_model[0].weight
    _train(model, opt, batches[3:], layerwise)
    _train(twin_model, twin_opt, batches[3:], layerwise)
    _assert_same(model, twin_model)
    if layerwise:
        assert all(p.grad is None for p in twin_model.parameters())  # its own hooks stepped and freed them


def test_a_copy_in_the_middle_of_a_layerwise_accumulation_finishes_it():
    model = _model()
    opt = GaLoreAdamW(_groups(model), lr=1e-2, layerwise=True, accumulation_steps=2)
    batches = _batches(5)
    _train(model, opt, batches[:3], layerwise=True)  # 1.5 accumulations: one backward pending
    twin_model, twin_opt = copy.deepcopy((model, opt))
    for p, q in zip(model.parameters(), twin_model.parameters()):  # torch copies no .grad
        q.grad = p.grad.clone()
    _train(model, opt, batches[3:], layerwise=True)
    _train(twin_model, twin_opt, batches[3:], layerwise=True)
    _assert_same(model, twin_model)


def test_a_copy_keeps_the_compile_option():
    model = _model()
    opt = GaLoreAdamW(_groups(model), compile={"backend": "eager"})
    twin = copy.deepcopy(opt)
    assert twin._compile_options == opt._compile_options == {"fullgraph": True, "backend": "eager"}


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_a_state_dict_with_python_number_steps_loads_and_continues(cls):
    model = _model()
    opt = _make(cls, model)
    batches = _batches(6)
    _train(model, opt, batches[:3])
    saved = opt.state_dict()
    old_style = copy.deepcopy(saved)
    for values in old_style["state"].values():
        for key in ("step", "proj_step"):
            if key in values:
                values[key] = int(values[key].item()) if key == "proj_step" else float(values[key].item())
    twin_model = copy.deepcopy(model)
    twin_opt = _make(cls, twin_model)
    twin_opt.load_state_dict(old_style)
    for values in twin_opt.state.values():
        assert isinstance(values["step"], torch.Tensor) and values["step"].dtype == torch.float32
    _train(model, opt, batches[3:])
    _train(twin_model, twin_opt, batches[3:])
    _assert_same(model, twin_model)


def _strided_pair():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(7, 9, generator=g)
    strided = nn.Parameter(base.t())  # (9, 7) with strides (1, 9)
    contiguous = nn.Parameter(base.t().contiguous())
    grad = torch.randn(9, 7, generator=g)  # contiguous: strides differ from the strided parameter's
    return strided, contiguous, grad


def _torch_twin(impl: dict) -> dict:
    """torch.optim.AdamW's flags for the implementation galorex runs with ``impl``: with neither
    flag set galorex takes torch's fused kernel (on the CPU), which torch takes only when asked."""
    return impl if impl else {"fused": True}


@pytest.mark.parametrize(
    "impl", [{}, {"foreach": True}, {"foreach": False}, {"fused": False}, {"fused": True}], ids=str
)
def test_a_strided_parameter_gets_the_update_of_a_contiguous_copy(impl):
    strided, contiguous, grad = _strided_pair()
    assert strided.stride() != grad.stride()
    opts = [GaLoreAdamW([strided], lr=0.1, **impl), GaLoreAdamW([contiguous], lr=0.1, **impl)]
    ref_param = nn.Parameter(contiguous.detach().clone())
    ref = torch.optim.AdamW([ref_param], lr=0.1, **_torch_twin(impl))
    for _ in range(3):
        for p, o in zip((strided, contiguous, ref_param), (*opts, ref)):
            p.grad = grad.clone()
            o.step()
    torch.testing.assert_close(strided, contiguous, rtol=0, atol=0)
    torch.testing.assert_close(contiguous, ref_param, rtol=0, atol=0)


def _record_adam_implementations(monkeypatch) -> list[str]:
    """The names of torch's AdamW implementations called from now on, in order."""
    import torch.optim.adam as adam_module

    called: list[str] = []
    for name in ("_single_tensor_adam", "_multi_tensor_adam", "_fused_adam"):
        real = getattr(adam_module, name)
        monkeypatch.setattr(adam_module, name, lambda *a, _n=name, _r=real, **k: (called.append(_n), _r(*a, **k)))
    return called


@pytest.mark.parametrize(
    "impl, ours, torchs",
    [
        ({}, "_fused_adam", "_single_tensor_adam"),  # the default: torch's fastest kernel on the CPU
        ({"foreach": True}, "_multi_tensor_adam", "_multi_tensor_adam"),
        ({"foreach": False}, "_single_tensor_adam", "_single_tensor_adam"),
        ({"fused": False}, "_single_tensor_adam", "_single_tensor_adam"),
        ({"fused": True}, "_fused_adam", "_fused_adam"),
    ],
    ids=["default", "foreach", "no-foreach", "no-fused", "fused"],
)
def test_foreach_and_fused_choose_the_implementation(impl, ours, torchs, monkeypatch):
    called = _record_adam_implementations(monkeypatch)
    model = _model()
    opt = GaLoreAdamW(model.parameters(), **impl)
    ref = torch.optim.AdamW(copy.deepcopy(model).parameters(), **impl)
    for o in (opt, ref):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
    assert called == [ours, torchs]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_the_default_takes_the_fused_kernel_per_device(strided, monkeypatch):
    """Per device type: the fused kernel where torch has it for the parameter, torch's own default
    where it has none (a device without the kernel, simulated by hiding the CPU's), a strided
    parameter included; the update is the same either way, to torch's fused-vs-loop tolerance."""
    from galorex.optim import dense

    results = {}
    for kernel_here in (True, False):
        if not kernel_here:
            monkeypatch.setattr(dense, "fused_devices", lambda: set())
        called = _record_adam_implementations(monkeypatch)
        param, _, grad = _strided_pair()
        if not strided:
            param = nn.Parameter(param.detach().contiguous())
        opt = GaLoreAdamW([param], lr=0.1)
        for _ in range(3):
            param.grad = grad.clone()
            opt.step()
        assert called == ["_fused_adam" if kernel_here else "_single_tensor_adam"] * 3
        results[kernel_here] = param.detach().clone()
    torch.testing.assert_close(results[True], results[False])  # float32's default tolerance, as torch's test


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_default_takes_the_fused_kernel_on_cuda(monkeypatch):
    called = _record_adam_implementations(monkeypatch)
    param, _, grad = _strided_pair()
    param = nn.Parameter(param.detach().cuda())  # strided on the GPU too
    opt = GaLoreAdamW([param], lr=0.1)
    param.grad = grad.cuda()
    opt.step()
    assert called == ["_fused_adam"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_the_default_is_torch_adamw_within_torchs_fused_tolerance(dtype):
    """torch's own test_fused_matches_forloop (test/test_optim.py, TestOptimRenewed._compare_between)
    compares its fused and for-loop AdamW over 7 steps with assertEqual's default tolerances for
    the dtype; galorex's default (the fused kernel) keeps to the same against torch's default (the
    loop) in float64 and float32. In bf16 the loop rounds every intermediate (moments, denominator,
    the decayed weight) to bf16 and the kernel rounds once, so they part by a few bf16 ulps within
    7 steps; there the default is held to torch's fused AdamW, step for step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6)).to(dtype)
    twin = copy.deepcopy(model)
    ours = GaLoreAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    bf16 = dtype == torch.bfloat16
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, fused=True if bf16 else None)
    for x, y in _batches(7):
        for m, o in ((model, ours), (twin, theirs)):
            o.zero_grad(set_to_none=True)
            (m(x.to(dtype)) - y.to(dtype)).square().mean().backward()
            o.step()
    tolerance = {"rtol": 0, "atol": 0} if bf16 else {}  # {}: assert_close's defaults for the dtype
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **tolerance)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], **tolerance)


@pytest.mark.parametrize("flag", ["maximize", "amsgrad"])
def test_maximize_and_amsgrad_are_torch_adamws_in_unprojected_groups(flag):
    model, ref_model = _model(), _model()
    ours = GaLoreAdamW(model.parameters(), lr=1e-2, **{flag: True})
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, fused=True, **{flag: True})  # our default's kernel
    batches = _batches(4)
    _train(model, ours, batches)
    _train(ref_model, ref, batches)
    _assert_same(model, ref_model)
    # and as a group key, beside a group that leaves it off
    model2 = _model()
    opt = GaLoreAdamW([{"params": [model2[0].weight], flag: True}, {"params": list(model2.parameters())[1:]}])
    assert opt.param_groups[0][flag] and not opt.param_groups[1][flag]


@pytest.mark.parametrize("flag", ["maximize", "amsgrad"])
@pytest.mark.parametrize("cls", ADAM_FAMILY, ids=lambda c: c.__name__)
def test_maximize_and_amsgrad_are_refused_in_projected_groups(cls, flag):
    model = _model()
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: '{flag}' is not supported in a projected group"):
        cls(_groups(model), **{flag: True})
    groups = _groups(model)
    groups[0][flag] = True
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: '{flag}'"):
        cls(groups)
    with pytest.raises(ValueError, match=rf"'{flag}' needs torch's AdamW"):
        cls(model.parameters(), optim_bits=8, **{flag: True})


@pytest.mark.parametrize("flag", ["maximize", "amsgrad", "fused", "foreach"])
def test_adafactor_refuses_adamw_flags_in_groups(flag):
    groups = _groups(_model())
    groups[1][flag] = True
    with pytest.raises(ValueError, match=rf"param_groups\[1\]: '{flag}' is not supported by GaLoreAdafactor"):
        GaLoreAdafactor(groups)


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_capturable_and_differentiable_are_refused(flag):
    with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
        GaLoreAdamW(_model().parameters(), **{flag: True})


def test_fused_true_is_checked_up_front():
    with torch.device("meta"):
        meta = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"fused=True needs floating point.*'params'\]\[0\].*on meta"):
        GaLoreAdamW(meta.parameters(), fused=True)
    ints = nn.Parameter(torch.zeros(3, dtype=torch.int32), requires_grad=False)
    with pytest.raises(ValueError, match=r"fused=True needs floating point.*torch.int32"):
        GaLoreAdamW([ints], fused=True)
    with pytest.raises(ValueError, match="'fused' cannot be True together with foreach=True"):
        GaLoreAdamW(_model().parameters(), fused=True, foreach=True)
    with pytest.raises(ValueError, match="'fused' cannot be served with optim_bits=8"):
        GaLoreAdamW(_model().parameters(), fused=True, optim_bits=8)
    with pytest.raises(ValueError, match="'fused' must be True, False or None"):
        GaLoreAdamW(_model().parameters(), fused="yes")


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=str)
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_a_one_element_tensor_lr_of_any_shape_is_the_number(cls, shape):
    runs = []
    for lr in (1e-2, torch.full(shape, 1e-2)):
        model = _model()
        kw = {"lr": lr, "weight_decay": 0.1}
        if cls is GaLoreAdafactor:
            kw.update(relative_step=False, scale_parameter=False)
        opt = cls(_groups(model), **kw)
        _train(model, opt, _batches(3))
        runs.append(model)
    _assert_same(*runs)


def test_a_scheduler_on_a_relative_step_adafactor_says_what_to_do():
    opt = GaLoreAdafactor(_groups(_model()))  # lr=None: relative steps
    with pytest.raises(TypeError, match="relative_step=True .* has no 'lr' for an LR scheduler.*relative_step=False"):
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    opt.load_state_dict(opt.state_dict())  # the groups stay guarded after a load
    with pytest.raises(TypeError, match="no 'lr' for an LR scheduler"):
        torch.optim.lr_scheduler.StepLR(opt, 1)
    assert "lr: None" in repr(opt)


@pytest.mark.parametrize("cls", ADAM_FAMILY, ids=lambda c: c.__name__)
def test_the_defaults_are_torch_adamws(cls):
    ours = inspect.signature(GaLoreAdamW.__init__).parameters  # the others take its arguments
    torchs = inspect.signature(torch.optim.AdamW).parameters
    for name in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "fused"):
        assert ours[name].default == torchs[name].default, name
    model, ref_model = _model(), _model()
    ours_opt, ref = cls(model.parameters()), torch.optim.AdamW(ref_model.parameters())
    assert {k: v for k, v in ours_opt.defaults.items() if k in ref.defaults} == {
        k: v for k, v in ref.defaults.items() if k in ours_opt.defaults
    }
    # Step for step torch's AdamW with the kernel the default picks (test above: within torch's
    # fused-vs-loop tolerance of torch's own default), and with foreach=False its loop exactly.
    fused_model, loop_model, ref_loop_model = _model(), _model(), _model()
    fused_ref = torch.optim.AdamW(fused_model.parameters(), fused=True)
    loop, ref_loop = cls(loop_model.parameters(), foreach=False), torch.optim.AdamW(ref_loop_model.parameters())
    batches = _batches(4)
    for m, o in ((model, ours_opt), (fused_model, fused_ref), (loop_model, loop), (ref_loop_model, ref_loop)):
        _train(m, o, batches)
    _assert_same(model, fused_model)
    _assert_same(loop_model, ref_loop_model)
