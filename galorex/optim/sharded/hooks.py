"""Layer-wise updates under FSDP2: each parameter's shard is stepped right after its FSDP2 group's
reduce-scatter has landed, then its gradient is freed.

Why not the post-accumulate-grad hooks that layer-wise mode uses elsewhere: FSDP2 never accumulates
a gradient into the sharded parameter through autograd. In torch 2.13,
``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py:foreach_reduce`` assigns the
reduce-scattered shard directly (``fsdp_param.sharded_param.grad = new_sharded_dtensor_grad``, or
``+=`` into the existing one), so a hook registered on the sharded parameter never fires. The one
public hook after the reduction, ``FSDPModule.set_all_reduce_hook`` (``_fully_shard.py``), is handed
the flat reduce-scatter output of the whole group before it is split into per-parameter gradients,
and refuses modules with several parameter groups. There is no per-parameter "gradient reduced"
hook (torch 2.6 to 2.13).

The closest thing, built here: per-group stepping from FSDP2's post-backward. Each
``FSDPParamGroup.post_backward`` (run by autograd once the group's inputs have their gradients, or by
the root's final callback for groups whose inputs need none, such as the embedding's) is wrapped:
after FSDP2's own post-backward has reduce-scattered the group and assigned its gradient shards, the
current stream waits for that reduction, and each parameter of the group is stepped
(``_on_grad_ready``: layer-wise accumulation and ``per_param_grad_clip`` included) and its gradient
freed. So the gradient shards of one transformer block exist at a time (FSDP2's unit), never the
model's. Every rank runs the same groups' post-backward in the same order, so the collectives of the
steps pair up.

This reaches into FSDP2's internals (``_get_fsdp_state``, ``_fsdp_param_groups`` — or, before torch
2.8, ``_fsdp_param_group`` — ``fsdp_params``, ``sharded_param``, ``_post_reduce_event``); a torch
without them gets a clear error instead of a run that never steps.
"""

from __future__ import annotations

from typing import Any

import torch

LowRankOptimizer = Any

_MARK = "_galorex_post_backward"


def _param_groups(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    groups = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        found = getattr(state, "_fsdp_param_groups", None)
        if found is None:  # torch < 2.8: one group per module
            one = getattr(state, "_fsdp_param_group", None)
            found = [] if one is None else [one]
        groups.extend(found)
    return groups


class _Handle:
    """Undoes one wrapped post-backward (``remove()``, as a hook handle)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def remove(self) -> None:
        if _MARK in self.group.__dict__:
            del self.group.__dict__[_MARK]
            del self.group.__dict__["post_backward"]  # the class's method shows through again


def step_in_post_backward(opt: LowRankOptimizer, model: torch.nn.Module) -> list[_Handle]:
    """Wrap the post-backward of every FSDP2 parameter group of ``model`` so that it steps the
    group's parameters that ``opt`` holds (module docstring); returns handles that undo it.

    Raises:
        ValueError: ``model`` has no FSDP2 module, or this torch's FSDP2 lacks what this relies on.
    """
    try:
        groups = _param_groups(model)
    except (AttributeError, ImportError) as e:
        msg = f"layerwise=True with FSDP2: this torch's FSDP2 differs from what galorex uses: {e}"
        raise ValueError(msg) from None
    if not groups:
        raise ValueError("layerwise=True with FSDP2: the model has no fully_shard module; call fully_shard first")
    owned = {id(p) for group in opt.param_groups for p in group["params"]}
    handles = []
    for group in groups:
        if _MARK in group.__dict__ or not hasattr(group, "fsdp_params"):
            continue
        original = group.post_backward

        def post_backward(*args: Any, _group: Any = group, _original: Any = original) -> Any:
            out = _original(*args)
            event = getattr(_group, "_post_reduce_event", None)
            if event is not None:  # the reduce-scatter runs on its own stream (CUDA)
                _group.device_handle.current_stream().wait_event(event)
            for fsdp_param in _group.fsdp_params:
                p = fsdp_param.sharded_param
                if p.grad is not None and id(p) in owned:
                    opt._on_grad_ready(p)
            return out

        group.post_backward = post_backward
        group.__dict__[_MARK] = True
        handles.append(_Handle(group))
    return handles
