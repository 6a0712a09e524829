import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from galorex.models import MODEL_CONFIGS, Llama, LlamaConfig, get_config
from galorex.models.llama import Attention, RMSNorm, Rotary, apply_rotary, rotary_tables


def small_config(**overrides) -> LlamaConfig:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=16,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def tokens(cfg: LlamaConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Llama(get_config("llama-tiny"))


# --- forward -----------------------------------------------------------------


def test_tiny_shapes_and_loss(tiny):
    cfg = tiny.config
    idx = tokens(cfg, 2, 64)
    targets = tokens(cfg, 2, 64, seed=1)
    logits, loss = tiny(idx, targets)
    assert logits.shape == (2, 64, cfg.vocab_size)
    assert loss.shape == () and loss.dtype == torch.float32
    # Small init gives near-uniform predictions: loss close to ln(vocab).
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.3
    expected = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)

    logits2, loss2 = tiny(idx)
    assert loss2 is None
    torch.testing.assert_close(logits2, logits)


def test_full_context_and_too_long(tiny):
    cfg = tiny.config
    logits, _ = tiny(tokens(cfg, 1, cfg.max_seq_len))
    assert logits.shape[1] == cfg.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny(tokens(cfg, 1, cfg.max_seq_len + 1))


def test_causal(tiny):
    cfg = tiny.config
    idx = tokens(cfg, 2, 32)
    changed = idx.clone()
    changed[:, 20:] = (changed[:, 20:] + 7) % cfg.vocab_size
    a, _ = tiny(idx)
    b, _ = tiny(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_deterministic_init():
    cfg = small_config()
    torch.manual_seed(3)
    a = Llama(cfg)
    torch.manual_seed(3)
    b = Llama(cfg)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        assert torch.equal(pa, pb)


def test_init_statistics():
    cfg = small_config(hidden_size=128, intermediate_size=256, num_layers=4, vocab_size=512)
    torch.manual_seed(0)
    model = Llama(cfg)
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif "o_proj" in name or "down_proj" in name:
            assert abs(p.std().item() - out_std) < 0.15 * out_std, name
        else:
            assert abs(p.std().item() - cfg.init_std) < 0.15 * cfg.init_std, name


def test_parameter_names(tiny):
    names = {n for n, _ in tiny.named_parameters()}
    for expected in [
        "embed.weight",
        "lm_head.weight",
        "norm.weight",
        "layers.0.attn.q_proj.weight",
        "layers.0.attn.k_proj.weight",
        "layers.0.attn.v_proj.weight",
        "layers.0.attn.o_proj.weight",
        "layers.0.mlp.gate_proj.weight",
        "layers.0.mlp.up_proj.weight",
        "layers.0.mlp.down_proj.weight",
        "layers.0.attn_norm.weight",
        "layers.0.mlp_norm.weight",
    ]:
        assert expected in names
    assert not any("bias" in n for n in names)
    # Rotary tables are derived from the config and stay out of checkpoints.
    assert not any("rotary" in k or k.endswith(("cos", "sin")) for k in tiny.state_dict())


def test_tied_embeddings():
    cfg = small_config(tie_embeddings=True)
    model = Llama(cfg)
    assert model.lm_head.weight is model.embed.weight
    untied = Llama(small_config())
    assert model.num_parameters() == untied.num_parameters() - cfg.vocab_size * cfg.hidden_size
    _, loss = model(tokens(cfg, 2, 8), tokens(cfg, 2, 8, seed=1))
    loss.backward()
    assert model.embed.weight.grad is not None


# --- attention ---------------------------------------------------------------


def reference_attention(attn: Attention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Explicit softmax attention with k/v heads repeated by hand."""
    B, T, _ = x.shape
    H, KV, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, H, D).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(B, T, KV, D).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(B, T, KV, D).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k = torch.stack([k[:, h // (H // KV)] for h in range(H)], dim=1)
    v = torch.stack([v[:, h // (H // KV)] for h in range(H)], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, H * D) @ attn.o_proj.weight.T


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_attention_matches_reference(num_kv_heads):
    cfg = small_config(num_kv_heads=num_kv_heads)
    torch.manual_seed(0)
    attn = Attention(cfg)
    cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len)
    x = torch.randn(2, 10, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin))


def test_gqa_equals_mha_with_duplicated_kv_heads():
    gqa_cfg = small_config(num_heads=4, num_kv_heads=2)
    mha_cfg = dataclasses.replace(gqa_cfg, num_kv_heads=4)
    torch.manual_seed(0)
    gqa = Attention(gqa_cfg)
    mha = Attention(mha_cfg)
    D, n_rep = gqa_cfg.head_dim, 2
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(gqa_cfg.num_kv_heads, D, -1)
            getattr(mha, name).weight.copy_(w.repeat_interleave(n_rep, dim=0).reshape(-1, w.shape[-1]))
    cos, sin = rotary_tables(D, gqa_cfg.max_seq_len)
    x = torch.randn(3, 12, gqa_cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin))


# --- rotary ------------------------------------------------------------------


def test_rotary_relative_position():
    D, T = 16, 64
    cos, sin = rotary_tables(D, T, theta=10000.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(D, dtype=torch.float64, generator=g)
    k = torch.randn(D, dtype=torch.float64, generator=g)

    def rotated_at(v, pos):
        x = v.expand(T, D)  # the same vector at every position
        return apply_rotary(x, cos, sin)[pos]

    def score(m, n):
        return torch.dot(rotated_at(q, m), rotated_at(k, n)).item()

    for m, n in [(5, 2), (10, 10), (3, 9)]:
        for shift in (1, 17, 40):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-12)
    # And it does depend on the offset itself.
    assert abs(score(5, 2) - score(5, 3)) > 1e-6


def test_rotary_is_rotation():
    D, T = 8, 20
    cos, sin = rotary_tables(D, T, dtype=torch.float64)
    x = torch.randn(2, 3, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0 is the identity
    # Rotate-half layout: channels j and j + D/2 rotate together by pos * inv_freq[j].
    pos, j = 7, 1
    angle = pos * 10000.0 ** (-2 * j / D)
    a, b = x[..., pos, j], x[..., pos, j + D // 2]
    torch.testing.assert_close(y[..., pos, j], a * math.cos(angle) - b * math.sin(angle))
    torch.testing.assert_close(y[..., pos, j + D // 2], b * math.cos(angle) + a * math.sin(angle))


def test_rotary_tables_survive_dtype_and_device_moves():
    cfg = small_config()
    fresh = Rotary(cfg.head_dim, cfg.max_seq_len).cos
    model = Llama(cfg).to(torch.bfloat16)
    assert model.rotary.cos.dtype == torch.float32
    torch.testing.assert_close(model.rotary.cos, fresh)

    with torch.device("meta"):
        meta_model = Llama(cfg)
    meta_model.to_empty(device="cpu")
    meta_model.init_weights()
    torch.testing.assert_close(meta_model.rotary.cos, fresh)
    logits, _ = meta_model(tokens(cfg, 1, 8))
    assert torch.isfinite(logits).all()


# --- sizes -------------------------------------------------------------------


def expected_params(cfg: LlamaConfig) -> int:
    h, i, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    kv = cfg.num_kv_heads * cfg.head_dim
    attn = 2 * h * h + 2 * h * kv  # q, o and the (possibly narrower) k, v
    head = 0 if cfg.tie_embeddings else V * h
    return V * h + head + L * (attn + 3 * h * i + 2 * h) + h


def test_llama_60m_parameter_count_on_meta():
    cfg = get_config("llama-60m")
    with torch.device("meta"):
        model = Llama(cfg)
    assert all(p.is_meta for p in model.parameters())
    h, i, V, L = 512, 1376, 32000, 8
    exact = 2 * V * h + L * (4 * h * h + 3 * h * i) + (2 * L + 1) * h
    assert model.num_parameters() == exact == 58_073_600
    assert model.num_parameters(exclude_embeddings=True) == exact - V * h


@pytest.mark.parametrize(
    "name,paper_millions",
    [("llama-60m", 58), ("llama-130m", 134), ("llama-350m", 368), ("llama-1b", 1339), ("llama-7b", 6738)],
)
def test_paper_config_sizes(name, paper_millions):
    cfg = get_config(name)
    assert cfg.num_kv_heads == cfg.num_heads and cfg.vocab_size == 32000
    with torch.device("meta"):
        model = Llama(cfg)
    n = model.num_parameters()
    assert n == expected_params(cfg)
    assert abs(n / 1e6 - paper_millions) / paper_millions < 0.02


def test_tiny_config_and_gqa_count(tiny):
    cfg = tiny.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (256, 128, 352)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.max_seq_len) == (4, 4, 2, 256)
    assert tiny.num_parameters() == expected_params(cfg)


# --- config ------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("vocab_size", 0),
        ("hidden_size", -4),
        ("num_layers", 1.5),
        ("num_heads", True),
        ("max_seq_len", 0),
        ("norm_eps", 0.0),
        ("rope_theta", -1.0),
        ("init_std", float("nan")),
        ("tie_embeddings", "yes"),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


def test_config_shape_constraints():
    with pytest.raises(ValueError, match="hidden_size"):
        small_config(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="head_dim"):
        small_config(hidden_size=36, num_heads=12, num_kv_heads=12)  # head_dim 3
    with pytest.raises(ValueError, match="num_kv_heads"):
        small_config(num_heads=4, num_kv_heads=3)


def test_from_dict_round_trip_and_unknown_keys():
    cfg = small_config(tie_embeddings=True, rope_theta=500000.0)
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict()
    d["num_layer"] = 3
    d["dropout"] = 0.1
    with pytest.raises(ValueError, match="num_layer") as info:
        LlamaConfig.from_dict(d)
    assert "dropout" in str(info.value)
    d = cfg.to_dict()
    del d["num_heads"]
    with pytest.raises(ValueError, match="num_heads"):
        LlamaConfig.from_dict(d)


def test_json_round_trip(tmp_path):
    cfg = small_config(num_layers=3)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert LlamaConfig.from_json(path) == cfg
    assert get_config(str(path)) == cfg
    assert get_config(path, vocab_size=100).vocab_size == 100


def test_from_json_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json"):
        LlamaConfig.from_json(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        LlamaConfig.from_json(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**small_config().to_dict(), "colour": "red"}))
    with pytest.raises(ValueError, match="wrong.json.*colour"):
        LlamaConfig.from_json(wrong)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json"):
        LlamaConfig.from_json(listing)


def test_get_config():
    cfg = get_config("llama-tiny", vocab_size=1000)
    assert cfg.vocab_size == 1000
    assert MODEL_CONFIGS["llama-tiny"].vocab_size == 256  # registry untouched
    cfg.num_layers = 99
    assert get_config("llama-tiny").num_layers == 4
    with pytest.raises(ValueError, match="llama-60m") as info:
        get_config("llama-3b")
    assert "llama-3b" in str(info.value)
    with pytest.raises(ValueError, match="vocab_size"):
        get_config("llama-tiny", vocab_size=0)


# --- generation, gradients, dtypes --------------------------------------------


def test_generate_reproducible(tiny):
    cfg = tiny.config
    prompt = tokens(cfg, 2, 5)

    def sample(seed, **kw):
        return tiny.generate(prompt, 12, generator=torch.Generator().manual_seed(seed), **kw)

    a, b = sample(0, temperature=0.9, top_k=20), sample(0, temperature=0.9, top_k=20)
    assert a.shape == (2, 17)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt)
    assert not torch.equal(sample(0), sample(1))

    greedy = tiny.generate(prompt, 6, temperature=0)
    assert torch.equal(greedy, tiny.generate(prompt, 6, temperature=0))
    logits, _ = tiny(prompt)
    assert torch.equal(greedy[:, 5], logits[:, -1].argmax(-1))

    top1 = sample(7, temperature=1.0, top_k=1)
    assert torch.equal(top1[:, 5], greedy[:, 5])


def test_generate_crops_context():
    cfg = small_config(max_seq_len=8)
    model = Llama(cfg)
    out = model.generate(tokens(cfg, 1, 8), 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 13)


def test_backward_gives_finite_grads_everywhere(tiny):
    cfg = tiny.config
    tiny.zero_grad(set_to_none=True)
    _, loss = tiny(tokens(cfg, 2, 32), tokens(cfg, 2, 32, seed=1))
    loss.backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    tiny.zero_grad(set_to_none=True)


def test_bf16_forward():
    cfg = get_config("llama-tiny")
    torch.manual_seed(0)
    model = Llama(cfg)
    idx, targets = tokens(cfg, 2, 32), tokens(cfg, 2, 32, seed=1)
    ref_logits, ref_loss = model(idx, targets)
    model.to(torch.bfloat16)
    logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref_loss.item()) < 0.05
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_rmsnorm_bf16_matches_float32():
    norm = RMSNorm(64, eps=1e-6)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 30
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), ref)
    out = norm.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
