"""Layer-wise updates (the GaLore paper's per-layer weight update, §4.2): each parameter is stepped
from a post-accumulate-grad hook as soon as backward() has its gradient, then the gradient is freed,
so the model's gradients never exist all at once (under FSDP2: from each FSDP2 group's post-backward,
once its reduce-scatter has landed; :meth:`LayerwiseMixin.register_fsdp2_hooks`). Mixed into
``LowRankOptimizer``; the step itself is the loop's (``_step_one`` takes one parameter through the
same refresh and update as ``step()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .config import is_int, is_real
from .plan import Plan, is_dtensor


class LayerwiseMixin:
    """``layerwise``, ``accumulation_steps`` and ``per_param_grad_clip`` of every galorex optimizer."""

    def _configure_layerwise(self, layerwise: bool, accumulation_steps: int, clip: float | None) -> None:
        """Validate and store the mode's settings (hooks are registered per group afterwards).

        Args:
            layerwise: step each parameter from its post-accumulate-grad hook.
            accumulation_steps: step on every k-th backward of a parameter (layer-wise only).
            clip: ``per_param_grad_clip``: clip each gradient to this norm first (layer-wise only).

        Raises:
            TypeError, ValueError: a bad value, or a layer-wise setting without ``layerwise``.
        """
        if not isinstance(layerwise, bool):
            raise TypeError(f"layerwise must be True or False, got {layerwise!r}")
        if not is_int(accumulation_steps) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
        if clip is not None and (not is_real(clip) or not math.isfinite(float(clip)) or float(clip) <= 0):
            raise ValueError(f"per_param_grad_clip must be a finite number > 0 or None, got {clip!r}")
        if not layerwise and accumulation_steps != 1:
            raise ValueError(
                f"accumulation_steps={accumulation_steps} applies only with layerwise=True; in the "
                "normal mode accumulate by calling step() once every k backward passes"
            )
        if not layerwise and clip is not None:
            raise ValueError(
                "per_param_grad_clip applies only with layerwise=True; in the normal mode call "
                "torch.nn.utils.clip_grad_norm_ before step()"
            )
        self._layerwise = layerwise
        self._accumulation_steps = int(accumulation_steps)
        self._per_param_grad_clip = None if clip is None else float(clip)
        self._backward_counts: dict[torch.Tensor, int] = {}
        self._layerwise_handles: list[Any] = []
        self._grad_reducer: Callable[[torch.Tensor], None] | None = None

    def _register_layerwise_hooks(self, group_index: int) -> None:
        """Hook :meth:`_on_grad_ready` to every trainable parameter of a group. A DTensor (FSDP2)
        gets no such hook, which would never fire (FSDP2 assigns its gradient shard directly):
        :meth:`register_fsdp2_hooks` steps it from FSDP2's post-backward instead."""
        for p in self.param_groups[group_index]["params"]:
            if p.requires_grad and not is_dtensor(p):
                self._layerwise_handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    def register_fsdp2_hooks(self, model: torch.nn.Module) -> None:
        """Layer-wise updates under FSDP2: step each parameter's shard as soon as its FSDP2 group's
        reduce-scatter has landed, then free its gradient (``galorex.optim.sharded.hooks``, which
        says why FSDP2 needs this instead of the post-accumulate-grad hooks). Call it once, after
        ``fully_shard``; :meth:`remove_layerwise_hooks` undoes it.

        Args:
            model: the module ``fully_shard`` was applied to (its FSDP2 submodules are found in it).

        Raises:
            ValueError: the optimizer was built without ``layerwise=True``, or the model has no FSDP2
                module.
        """
        if not self._layerwise:
            raise ValueError("register_fsdp2_hooks needs an optimizer built with layerwise=True")
        from .sharded import step_in_post_backward

        self._layerwise_handles.extend(step_in_post_backward(self, model))

    def _locate(self, p: torch.Tensor) -> tuple[int, int, int]:
        """(group index, index in the group, index over all groups) of a parameter."""
        offset = 0
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return gi, pi, offset + pi
            offset += len(group["params"])
        raise RuntimeError("layerwise=True: a hooked parameter is no longer in any parameter group")

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: on every k-th backward, step this parameter and free its gradient."""
        count = self._backward_counts.get(p, 0) + 1
        if count < self._accumulation_steps:
            self._backward_counts[p] = count
            return
        self._backward_counts[p] = 0
        with torch.no_grad():
            if self._grad_reducer is not None and p.grad is not None:
                self._grad_reducer(p.grad)
            self._step_one(*self._locate(p))
        p.grad = None  # the point of the mode: this gradient is never held next to the others

    def _step_one(self, gi: int, pi: int, index: int) -> None:
        """The step of one parameter, exactly as step() would take it (its refresh included),
        after clipping its gradient to ``per_param_grad_clip``.

        Args:
            gi, pi: its group and its index in the group.
            index: its index over all groups (seeds a randomized refresh).
        """
        group = self.param_groups[gi]
        p = group["params"][pi]
        if p.grad is None:
            return
        self._check_grad(p, gi, pi)
        if self._per_param_grad_clip is not None:
            # clip_grad_norm_'s rule, applied to this parameter's gradient alone.
            norm = torch.linalg.vector_norm(p.grad)
            p.grad.mul_(torch.clamp(self._per_param_grad_clip / (norm + 1e-6), max=1.0))
        if is_dtensor(p):
            from .sharded import step_one

            return step_one(self, gi, pi, index)
        if self.is_projected(group, p):
            plan = Plan(p, gi, pi, index, self.side_of(group, p))
            self._prepare_projection(group, plan)
            self._commit_refresh(group, plan)
            self._lowrank_step(group, [plan])
        else:
            self._dense_step(group, [p])

    def _layerwise_step_call(self, closure: Callable[[], Any] | None) -> None:
        if closure is not None:
            raise RuntimeError(
                "layerwise=True: step(closure) is not supported; parameters are stepped during "
                "backward(), so call loss.backward() yourself (step() is then a no-op)"
            )
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and self._backward_counts.get(p, 0) == 0:
                    if is_dtensor(p):
                        raise RuntimeError(
                            f"layerwise=True: {self._param_label(gi, pi)} is an FSDP2 (DTensor) parameter "
                            "holding a gradient no hook stepped: call optimizer.register_fsdp2_hooks(model) "
                            "once after fully_shard, and zero_grad() before the first backward"
                        )
                    raise RuntimeError(
                        f"layerwise=True: {self._param_label(gi, pi)} holds a gradient that no "
                        "backward() delivered to its hook (set by hand, or zero_grad() was not "
                        "called before?); in layer-wise mode only backward() steps parameters"
                    )

    def set_layerwise_grad_reducer(self, reducer: Callable[[torch.Tensor], None] | None) -> None:
        """Have each complete gradient passed to ``reducer`` (in place) just before its layer-wise
        step: e.g. averaged over data-parallel ranks, which is how ``galorex-train --distributed ddp
        --layerwise`` runs without DDP's buckets. Every rank's hooks fire in the same order (the
        same graph), so collectives issued here pair up; every parameter must get a gradient on
        every rank, as under DDP without ``find_unused_parameters``."""
        if not self._layerwise:
            raise ValueError("set_layerwise_grad_reducer needs an optimizer built with layerwise=True")
        if reducer is not None and not callable(reducer):
            raise TypeError(f"reducer must be callable or None, got {reducer!r}")
        self._grad_reducer = reducer

    def remove_layerwise_hooks(self) -> None:
        """Detach the layer-wise hooks from the parameters (e.g. before handing them to another optimizer)."""
        for handle in self._layerwise_handles:
            handle.remove()
        self._layerwise_handles.clear()

    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict()``; refused (RuntimeError) in the middle of a layer-wise
        gradient accumulation."""
        if self._layerwise and any(self._backward_counts.values()):
            raise RuntimeError(
                "layerwise=True: state_dict() in the middle of a gradient accumulation (some "
                "parameters have seen fewer than accumulation_steps backward passes); take "
                "checkpoints between optimizer steps"
            )
        return super().state_dict()
