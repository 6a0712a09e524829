"""adam_directions writing into given tensors (the loop passes the low-rank gradients themselves)
gives the same moments and directions, bit for bit, as with new tensors."""

import pytest
import torch

from galorex.optim.adam_math import adam_directions


def _problem(seed: int, shapes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    ms = [torch.randn(s, generator=gen, dtype=dtype) * 0.1 for s in shapes]
    vs = [torch.rand(s, generator=gen, dtype=dtype) * 0.01 for s in shapes]
    return grads, ms, vs


@pytest.mark.parametrize("eps_mode", ["torch", "galore_torch"])
@pytest.mark.parametrize("tensor_hparams", [False, True])
@pytest.mark.parametrize("into", ["grads", "other"])
def test_out_equals_new_tensors(eps_mode, tensor_hparams, into):
    shapes = [(7, 5), (3, 11), (1, 4)]
    steps = [1, 3, 250]
    hp = (0.9, 0.999, 1e-8)
    if tensor_hparams:
        hp = tuple(torch.tensor(h, dtype=torch.float64) for h in hp)
        steps = [torch.tensor(float(s)) for s in steps]
    grads, ms, vs = _problem(0, shapes)
    expected = adam_directions(grads, ms, vs, steps, *hp, eps_mode)
    grads2, ms2, vs2 = _problem(0, shapes)
    out = grads2 if into == "grads" else [torch.full_like(g, float("nan")) for g in grads2]
    got = adam_directions(grads2, ms2, vs2, steps, *hp, eps_mode, out=out)
    assert all(a is b for a, b in zip(got, out))
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    for a, b in zip(ms + vs, ms2 + vs2):
        assert torch.equal(a, b)
