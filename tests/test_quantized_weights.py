"""INT8 weights (galorex.weights): the QuantizedWeight parameter, quantize_weights on galorex's and
Hugging Face's Llama, and every optimizer's write into INT8 and stochastically rounded bf16 weights
against a float32 weight stepped the same way, layer-wise mode and resume."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import galorex
from galorex.models.llama import build_llama, get_config
from galorex.optim import config
from galorex.optim.factory import build_optimizer
from galorex.optim.writes import _ROUNDING_STREAM
from galorex.weights import (
    QuantizedWeight,
    dequantize_weights,
    quantize_weights,
)
from galorex.weights import codes as C

pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quantized(rows=24, cols=64, group=32, dtype=torch.float32, seed=0) -> QuantizedWeight:
    w = torch.randn(rows, cols, generator=_gen(seed)) * 0.05
    return QuantizedWeight(*C.quantize(w, group), group, dtype, requires_grad=True)


# ----------------------------------------------------------------------------- the parameter
def test_linear_forward_and_backward_equal_the_dequantised_weight_in_float64():
    w = nn.Parameter(_quantized(dtype=torch.float64))
    x = torch.randn(5, 3, 64, dtype=torch.float64, generator=_gen(1), requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, generator=_gen(2), requires_grad=True)
    y = F.linear(x, w, b)
    ref_w = w.dequantize().clone().requires_grad_(True)
    x_ref, b_ref = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, ref_w, b_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-14)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert type(w.grad) is torch.Tensor and w.grad.dtype == torch.float64
    for got, want in ((x.grad, x_ref.grad), (w.grad, ref_w.grad), (b.grad, b_ref.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_gradient_hooks_and_activation_checkpointing_see_a_dense_gradient():
    lin = nn.Linear(64, 24, bias=False)
    lin.weight = nn.Parameter(_quantized())
    seen = []
    lin.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    x = torch.randn(4, 64, generator=_gen(3))
    torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=False).sum().backward()
    plain = torch.ones(4, 24).mT @ x
    assert len(seen) == 1 and torch.allclose(seen[0], plain, atol=1e-6)


def test_copies_moves_and_serialisation_keep_the_codes():
    w = nn.Parameter(_quantized(dtype=torch.bfloat16))
    for other in (copy.deepcopy(w), pickle.loads(pickle.dumps(w)), w.detach().clone(), w.to("cpu", copy=True)):
        assert isinstance(other, QuantizedWeight) and other.dtype == torch.bfloat16
        assert torch.equal(other.codes, w.codes) and torch.equal(other.scales, w.scales)
    assert copy.deepcopy(w).codes.data_ptr() != w.codes.data_ptr()
    as_float = w.to(torch.float32)
    assert isinstance(as_float, QuantizedWeight) and as_float.dtype == torch.float32
    assert torch.equal(as_float.codes, w.codes)
    assert torch.equal(torch.zeros_like(w), torch.zeros(24, 64, dtype=torch.bfloat16))
    assert torch.equal(w.sum(), w.dequantize().sum())  # reading works everywhere


def test_in_place_updates_are_refused_but_copy_quantises():
    w = _quantized()
    with pytest.raises(TypeError, match="cannot be updated in place"):
        w.detach().add_(1.0)
    values = torch.randn(24, 64, generator=_gen(4))
    w.detach().copy_(values)
    codes, scales = C.quantize(values, 32)
    assert torch.equal(w.codes, codes) and torch.equal(w.scales, scales)


def test_quantize_weights_on_llama_and_the_state_dict_round_trip():
    model = build_llama(get_config("llama-tiny"), dtype=torch.float32, seed=0)
    reference = copy.deepcopy(model)
    assert quantize_weights(model) == 4 * 7
    assert quantize_weights(model) == 0  # already quantised
    assert isinstance(model.layers[0].mlp.up_proj.weight, QuantizedWeight)
    assert type(model.lm_head.weight) is nn.Parameter and type(model.embed.weight) is nn.Parameter
    sd = model.state_dict()
    assert sd["layers.1.attn.o_proj.weight_codes"].dtype == torch.int8
    assert sd["layers.1.attn.o_proj.weight_scales"].dtype == torch.float32
    assert "layers.1.attn.o_proj.weight" not in sd
    buf = io.BytesIO()
    torch.save(sd, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    again = build_llama(get_config("llama-tiny"), dtype=torch.float32, seed=5)
    quantize_weights(again)
    again.load_state_dict(loaded)
    x = torch.randint(0, 256, (2, 12), generator=_gen(5))
    assert torch.equal(again(x)[0], model(x)[0])
    # A float state dict loads into a quantised model (rounded to nearest), and back.
    fresh = build_llama(get_config("llama-tiny"), dtype=torch.float32, seed=5)
    quantize_weights(fresh)
    fresh.load_state_dict(reference.state_dict())
    assert torch.equal(fresh(x)[0], model(x)[0])
    assert dequantize_weights(fresh) == 28 and "layers.0.attn.q_proj.weight" in fresh.state_dict()


def test_build_llama_quantises_piece_by_piece_like_quantize_weights():
    cfg = get_config("llama-tiny")
    whole = build_llama(cfg, dtype=torch.bfloat16, seed=3)
    quantize_weights(whole, group_size=64)
    pieces = build_llama(cfg, dtype=torch.bfloat16, seed=3, weight_bits=8, weight_group_size=64)
    a, b = whole.state_dict(), pieces.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_weights_refuses_bad_input():
    model = build_llama(get_config("llama-tiny"), seed=0)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_weights(model, bits=4)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        quantize_weights(model, group_size=100)
    with pytest.raises(ValueError, match="no nn.Linear of Llama matches target_modules='conv'"):
        quantize_weights(model, target_modules="conv")
    assert not any(isinstance(p, QuantizedWeight) for p in model.parameters())


def test_hugging_face_llama_converts_and_round_trips():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    assert quantize_weights(model, group_size=64) == 2 * 7
    assert type(model.lm_head.weight) is nn.Parameter
    x = torch.randint(0, 96, (2, 10), generator=_gen(6))
    out = model(x, labels=x)
    out.loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert type(grad) is torch.Tensor and grad.shape == (64, 64)
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(cfg)
    quantize_weights(other, group_size=64)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(x).logits, model(x).logits)
    dequantize_weights(other)
    assert torch.equal(other(x).logits, model(x).logits)  # the same values, as plain weights


# ----------------------------------------------------------------------------- the optimizers' write
NAMES = ["galore", "natural-galore", "gradnorm-lorp", "fira", "apollo", "apollo-mini", "galore-adafactor", "adamw"]


def _model_pair():
    """A tiny Llama with INT8 weights and the same model with those weights as plain float32 values."""
    quantized = build_llama(get_config("llama-tiny"), seed=0, weight_bits=8, weight_group_size=64)
    plain = copy.deepcopy(quantized)
    dequantize_weights(plain)
    return quantized, plain


def _opt(name, model, **kw):
    extra = {} if name in ("apollo-mini", "adamw") else {"rank": 8, "update_proj_gap": 2}
    if name == "adamw":
        return galorex.GaLoreAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kw)
    return build_optimizer(name, model, lr=1e-2, weight_decay=0.1, **extra, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_a_step_on_int8_weights_is_the_float32_step_rounded_with_the_seeded_draws(name):
    quantized, plain = _model_pair()
    qopt, popt = _opt(name, quantized, rounding_seed=3), _opt(name, plain, rounding_seed=3)
    x = torch.randint(0, 256, (2, 16), generator=_gen(7))
    for model, opt in ((quantized, qopt), (plain, popt)):
        model(x, x)[1].backward()
        opt.step()
    qparams, pparams = dict(quantized.named_parameters()), dict(plain.named_parameters())
    index = {id(p): i for i, p in enumerate(p for g in qopt.param_groups for p in g["params"])}
    checked = 0
    for key, q in qparams.items():
        if not isinstance(q, QuantizedWeight):
            assert torch.equal(q, pparams[key]), key
            continue
        step = int(qopt.state[q]["step"])
        seed = config.mix_seed(3, index[id(q)], step, _ROUNDING_STREAM)
        codes, scales = C.quantize(pparams[key].detach(), 64, "stochastic", _gen(seed))
        assert torch.equal(q.codes, codes) and torch.equal(q.scales, scales), key
        checked += 1
    assert checked == 28


def test_int8_layerwise_equals_normal_and_resume_is_bit_for_bit():
    x = [torch.randint(0, 256, (2, 16), generator=_gen(s)) for s in range(4)]

    def run(layerwise: bool, split: bool):
        model = build_llama(get_config("llama-tiny"), seed=0, weight_bits=8, weight_group_size=64)
        opt = build_optimizer("galore", model, lr=1e-2, rank=8, update_proj_gap=2, layerwise=layerwise)
        for i, batch in enumerate(x):
            if split and i == 2:  # save, build everything anew, load, go on
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
                ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
                model = build_llama(get_config("llama-tiny"), seed=9, weight_bits=8, weight_group_size=64)
                model.load_state_dict(ckpt["model"])
                opt = build_optimizer("galore", model, lr=1e-2, rank=8, update_proj_gap=2, layerwise=layerwise)
                opt.load_state_dict(ckpt["opt"])
            model(batch, batch)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model.state_dict()

    normal = run(False, False)
    for other in (run(True, False), run(False, True), run(True, True)):
        assert normal.keys() == other.keys()
        assert all(torch.equal(normal[k], other[k]) for k in normal)


def test_stochastic_bf16_writes_keep_small_updates_in_expectation():
    """An update of 1/8 of a bf16 step vanishes to nearest; stochastically, it survives on average."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.ones(256, 256, dtype=torch.bfloat16))  # bf16 step at 1.0: 2^-7
    for rounding, expected in (("nearest", 0.0), ("stochastic", 2**-10)):
        p = nn.Parameter(w.detach().clone())
        opt = galorex.GaLoreAdamW([p], lr=2**-10, weight_decay=0.0, weight_rounding=rounding)
        p.grad = -torch.ones_like(p)  # Adam's first step: a direction of exactly −1 per element
        opt.step()
        moved = float((p.detach().double() - 1.0).mean())
        # Each element moves by 0 or one step 2^-7 with probability 1/8: the mean over 65536
        # elements is within Hoeffding's bound (miss probability 1e-9) of 2^-10.
        bound = 2**-7 * math.sqrt(math.log(2 / 1e-9) / (2 * 65536))
        assert abs(moved - expected) <= bound, (rounding, moved)
        assert opt.state[p]["exp_avg"].dtype == (torch.float32 if rounding == "stochastic" else torch.bfloat16)


def test_stochastic_bf16_matches_the_float32_step_with_the_same_draws():
    torch.manual_seed(1)
    base = build_llama(get_config("llama-tiny"), dtype=torch.bfloat16, seed=0)
    plain = copy.deepcopy(base).float()
    opt = build_optimizer("galore", base, lr=1e-2, rank=8, weight_rounding="stochastic", rounding_seed=2)
    popt = build_optimizer("galore", plain, lr=1e-2, rank=8)
    x = torch.randint(0, 256, (2, 16), generator=_gen(8))
    # The bf16 model's gradient, handed to the float32 one, so both steps see the same numbers.
    base(x, x)[1].backward()
    for p, q in zip(base.parameters(), plain.parameters()):
        q.grad = p.grad.float()
    opt.step()
    popt.step()
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    for (name, p), q in zip(base.named_parameters(), plain.parameters()):
        seed = config.mix_seed(2, index[id(p)], int(opt.state[p]["step"]), _ROUNDING_STREAM)
        want = C.round_to_bf16_(torch.empty_like(p), q.detach().contiguous(), "stochastic", _gen(seed))
        assert torch.equal(p.detach(), want), name


def test_optimizer_state_of_int8_dense_weights_stays_float32_through_load_state_dict():
    model = build_llama(get_config("llama-tiny"), dtype=torch.bfloat16, seed=0)
    quantize_weights(model, target_modules="all-linear")
    opt = galorex.GaLoreAdamW(model.parameters(), lr=1e-3)  # every weight on AdamW
    x = torch.randint(0, 256, (2, 8), generator=_gen(9))
    model(x, x)[1].backward()
    opt.step()
    q = model.layers[0].attn.q_proj.weight
    assert opt.state[q]["exp_avg"].dtype == torch.float32
    again = galorex.GaLoreAdamW(model.parameters(), lr=1e-3)
    again.load_state_dict(opt.state_dict())
    assert again.state[q]["exp_avg"].dtype == torch.float32
    assert again.state[model.embed.weight]["exp_avg"].dtype == torch.bfloat16  # torch's policy


def test_torch_adamw_is_refused_by_int8_weights_with_a_clear_error():
    model = build_llama(get_config("llama-tiny"), seed=0, weight_bits=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randint(0, 256, (2, 8), generator=_gen(10))
    model(x, x)[1].backward()
    with pytest.raises(TypeError, match="galorex optimizers write it"):
        opt.step()
    # The factory gives a galorex AdamW instead of torch's for such a model.
    assert isinstance(build_optimizer("adamw", model, lr=1e-3), galorex.GaLoreAdamW)


def test_bad_weight_rounding_names_the_key():
    p = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="'weight_rounding' must be None or one of"):
        galorex.GaLoreAdamW([p], weight_rounding="up")
    with pytest.raises(ValueError, match="'rounding_seed' must be an integer"):
        galorex.GaLoreAdamW([p], rounding_seed=1.5)


def test_a_non_finite_update_names_the_parameter():
    model = nn.Linear(64, 32, bias=False)
    quantize_weights(model, target_modules="all-linear", group_size=64)
    opt = galorex.GaLoreAdamW([{"params": [("w", model.weight)]}], lr=1e-3)
    model.weight.grad = torch.full((32, 64), float("nan"))
    with pytest.raises(FloatingPointError, match="'w'.*non-finite"):
        opt.step()


def test_compiled_update_writes_int8_weights_like_eager():
    """compile=True: the numeric update of each INT8 weight runs compiled on its working copy (one
    graph, fullgraph), the rounding outside it. Compiled arithmetic rounds like eager only to float32
    precision, so a draw within that distance of a value's fraction may round the other way: at
    most a few codes in a thousand, each one step apart."""
    torch._dynamo.reset()
    results = []
    for compile_ in (False, {"backend": "aot_eager"}):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96, bias=False), nn.Tanh(), nn.Linear(96, 64, bias=False))
        quantize_weights(model, target_modules="all-linear", group_size=32)
        groups = [{"params": list(model.parameters()), "rank": 8, "update_proj_gap": 2}]
        opt = galorex.GaLoreAdamW(groups, lr=1e-2, compile=compile_)
        for s in range(3):
            x = torch.randn(16, 64, generator=_gen(s))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        results.append([p.codes.clone() for p in model.parameters()])
    torch._dynamo.reset()
    for eager, compiled in zip(*results):
        differ = eager != compiled
        assert int(differ.sum()) <= max(1, eager.numel() // 200)
        assert int((eager.int() - compiled.int()).abs().max()) <= 1
