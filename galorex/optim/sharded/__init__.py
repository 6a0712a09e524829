"""The FSDP2 placement: how every galorex optimizer steps DTensor parameters (``fully_shard``).

Placement stays apart from the maths. A rule says nothing about ranks; at most it declares, in
``Rule.shard_local``, which of its computations act row by row or element by element, and the
placement then keeps those sharded. Everything else is computed on the whole matrix, gathered one
parameter at a time, which is always what one process computes.

- ``layout``: the sharded form of a parameter's state (DTensors split by rows; block-coded 8-bit
  and 4-bit state grouped so that no block straddles a shard boundary) and its conversions;
- ``step``: ``opt.step()`` on DTensors — the whole, subspace and rows strategies;
- ``hooks``: layer-wise updates stepped from FSDP2's post-backward.
"""

from __future__ import annotations

import torch

from .hooks import step_in_post_backward
from .layout import local_bytes
from .step import check_group, materialize_state, sharded_step, step_one


def local_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` held by this rank (a DTensor counts its local
    shard only), for any optimizer."""
    return sum(local_bytes(state) for state in opt.state.values())


__all__ = [
    "check_group",
    "local_state_bytes",
    "materialize_state",
    "sharded_step",
    "step_in_post_backward",
    "step_one",
]
