"""How a galorex optimizer is copied, pickled and restored from a state dict.

torch keeps only ``defaults``, ``state`` and ``param_groups`` in a pickle; the constructor's options
travel here too, so a copy steps exactly as the original. ``load_state_dict`` keeps subspace state
in the dtype it was saved with (torch would round the float32 basis and moments of a bf16 weight
to bf16), as does the float32 state of a weight stepped on a working copy (``galorex.weights``), and
step counters become CPU float32 tensors whatever the checkpoint held.
"""

from __future__ import annotations

from typing import Any

import torch

from ..weights.write import needs_working_copy
from . import codec
from .config import PROJ_STEP, WEIGHT_ROUNDING, as_step_tensor
from .dense import eight_bit


class CheckpointMixin:
    """Pickling, copying and ``load_state_dict`` of ``LowRankOptimizer`` (module docstring)."""

    # ------------------------------------------------------------------ copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        """torch keeps only defaults, state and param_groups; the constructor's options travel too
        (and layer-wise accumulation counts, by parameter position), so a deepcopied or unpickled
        optimizer steps exactly as the original. The layer-wise gradient reducer (a collective
        bound to a process group) does not travel: set it again on the copy."""
        state = super().__getstate__()
        counts = getattr(self, "_backward_counts", {})
        state["_galorex_options"] = {
            "compile": getattr(self, "_compile_options", None),
            "layerwise": getattr(self, "_layerwise", False),
            "accumulation_steps": getattr(self, "_accumulation_steps", 1),
            "per_param_grad_clip": getattr(self, "_per_param_grad_clip", None),
            "backward_counts": [counts.get(p, 0) for g in self.param_groups for p in g["params"]],
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickle (or the state ``load_state_dict`` installs): step counters become CPU
        tensors, and the constructor's options (compile, layer-wise hooks and counts) come back;
        a pickle of an older galorex, without them, gets the defaults."""
        options = state.pop("_galorex_options", None)
        super().__setstate__(state)
        # Steps stored as Python numbers (older checkpoints, hand-made states) become tensors, as
        # torch.optim.AdamW.__setstate__ does; load_state_dict comes through here too.
        for values in self.state.values():
            for key in self._cpu_state_keys:
                if key in values and not isinstance(values[key], torch.Tensor):
                    values[key] = as_step_tensor(values[key], torch.device("cpu"))
        if options is None:
            if not hasattr(self, "_layerwise"):  # a pickle of an older galorex
                self._compile_options = None
                self._compiled_fns = {}
                self._configure_layerwise(False, 1, None)
            return
        self._compile_options = options["compile"]
        self._compiled_fns = {}
        self._configure_layerwise(options["layerwise"], options["accumulation_steps"], options["per_param_grad_clip"])
        params = [p for g in self.param_groups for p in g["params"]]
        self._backward_counts = {p: c for p, c in zip(params, options["backward_counts"]) if c}
        if self._layerwise:
            for gi in range(len(self.param_groups)):
                self._register_layerwise_hooks(gi)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like ``Optimizer.load_state_dict``, but subspace state keeps its own dtype.

        torch casts every floating state tensor to its parameter's dtype, which would round the
        float32 basis and moments of a bf16 weight to bf16. Here the state of projected parameters
        keeps the dtype it was saved with and moves to its parameter's device; unprojected (AdamW)
        state is cast to its parameter's dtype, as torch does. ``step`` counters of projected
        parameters stay on the CPU (they drive the refresh schedule without a device sync).

        Args:
            state_dict: as ``Optimizer.state_dict()`` returned it (any galorex version; a group
                key newer than the checkpoint keeps the value this optimizer was built with).
        """
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        built = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict(state_dict)
        # A setting newer than the checkpoint (absent from its groups, e.g. basis_rotation) keeps the
        # value this optimizer's group was built with, rather than vanishing.
        for group, own in zip(self.param_groups, built):
            for key, value in own.items():
                group.setdefault(key, value)
        id_to_param = {}
        for saved, group in zip(saved_groups, self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                id_to_param[pid] = (p, group)
        keep_dtype = self.rule.keeps_dense_state_dtype
        for pid, values in saved_state.items():
            if pid not in id_to_param:
                continue
            p, group = id_to_param[pid]
            restored = {}
            # Subspace state: a stored basis, or the refresh counter every projected parameter has
            # (a generated projection stores no basis).
            projected = codec.has_basis(values) or PROJ_STEP in values
            for key, value in values.items():
                if key in self._cpu_state_keys:
                    keep_on_cpu = projected or not group.get("fused")
                    device = torch.device("cpu") if keep_on_cpu else p.device
                    if isinstance(value, torch.Tensor) and not value.is_floating_point():
                        restored[key] = value.detach().to(device=device, copy=True)  # a seed keeps its int64
                    else:
                        restored[key] = as_step_tensor(value, device)
                elif not isinstance(value, torch.Tensor):
                    restored[key] = value
                elif (
                    projected
                    or keep_dtype
                    or eight_bit(group)
                    or needs_working_copy(p, group.get(WEIGHT_ROUNDING))
                    or not (value.is_floating_point() and p.is_floating_point())
                ):
                    # 8-bit scales and float32 small moments keep their dtype, like subspace state;
                    # so does the float32 state of a weight stepped on a working copy (INT8 codes).
                    restored[key] = value.detach().to(device=p.device, copy=True)
                else:
                    restored[key] = value.detach().to(device=p.device, dtype=p.dtype, copy=True)
            self.state[p] = restored
