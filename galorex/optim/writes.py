"""The loop's write into weights stored below the compute precision (``galorex.weights``): INT8
codes, or bf16 under stochastic rounding. Mixed into ``LowRankOptimizer``.

Such a weight is updated on a float32 working copy, one parameter at a time (so one copy exists at
once), by the same rule code that updates a float32 weight in place — projected parameters through
the loop's numeric update, unprojected ones through the rule's dense step, whose state is then
float32 too — and stored back with one rounding (``galorex.weights.write.store_``). Stochastic
draws are seeded from (``rounding_seed``, the parameter's index over all groups, its step), as the
randomized refresh's sketch is, so a resumed run rounds exactly as the straight one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..weights import write as weight_write
from . import config
from .config import STEP
from .plan import Work

# A fourth value in the seed of the rounding's draws, so they never repeat a randomized refresh's
# sketch of the same parameter and step.
_ROUNDING_STREAM = 0x5752


class WeightWriteMixin:
    """Working copies and the rounding write (module docstring)."""

    def _update_on_copies(self, group: dict[str, Any], works: list[Work], update: Callable[..., None]) -> None:
        """Run the numeric ``update`` of each projected parameter in ``works`` on a float32 working
        copy of its weight, then store the copy (one parameter at a time)."""
        for w in works:
            target = weight_write.working_copy(w.param, config.compute_dtype(w.param.dtype))
            update(group, [w._replace(target=target)])
            self._store_weight(group, w.param, target)

    def _dense_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Unprojected parameters take the rule's dense step; those kept below the compute precision
        take it on a float32 working copy (their state float32), stored back with one rounding."""
        rounding = config.weight_write(group).weight_rounding
        copied = [p for p in params if weight_write.needs_working_copy(p, rounding)]
        if not copied:
            return self.rule.step_dense(group, params, self.state, self._compiled)
        plain = [p for p in params if not any(p is q for q in copied)]
        if plain:
            self.rule.step_dense(group, plain, self.state, self._compiled)
        for p in copied:
            w = weight_write.working_copy(p, config.compute_dtype(p.dtype))
            w.grad = p.grad.to(w.dtype)
            self.rule.step_dense(group, [w], _StateOf(self.state, w, p), self._compiled)
            w.grad = None
            self._store_weight(group, p, w)

    def _store_weight(self, group: dict[str, Any], p: torch.Tensor, w: torch.Tensor) -> None:
        """Round the updated working copy ``w`` into ``p`` (``galorex.weights.write.store_``)."""
        settings = config.weight_write(group)
        index = self._locate(p)  # (group, position, index over all groups)
        generator = None
        if weight_write.rounding_for(p, settings.weight_rounding) == "stochastic":
            step = int(self.state[p][STEP].item())
            seed = config.mix_seed(settings.rounding_seed, index[2], step, _ROUNDING_STREAM)
            generator = torch.Generator(device=w.device).manual_seed(seed)
        try:
            weight_write.store_(p, w, settings.weight_rounding, generator)
        except FloatingPointError:
            raise FloatingPointError(
                f"{self._param_label(index[0], index[1])}: the update made the weight non-finite; its INT8 "
                "codes keep the values of the groups before the first non-finite one"
            ) from None


class _StateOf:
    """``state_of`` of a dense step on a working copy: the copy's state is its parameter's."""

    def __init__(self, state: Any, copy: torch.Tensor, param: torch.Tensor) -> None:
        self._state, self._copy, self._param = state, copy, param

    def __getitem__(self, p: torch.Tensor) -> dict[str, Any]:
        return self._state[self._param if p is self._copy else p]


__all__ = ["WeightWriteMixin"]
