"""GradNormLoRPAdamW: weight-normalised, low-rank-projected Adam ("Gradient Weight-normalized
Low-rank Projection for Efficient LLM Training").

Each projected weight is read row-wise as W_i = g_i · v_i/‖v_i‖. With G = ∂L/∂W the exact
weight-norm gradients are

    ∂L/∂g_i = ⟨G_i, v̂_i⟩,        ∂L/∂v_i = (g_i/‖v_i‖) (G_i − ⟨G_i, v̂_i⟩ v̂_i)          (v̂ = v/‖v‖)

The direction gradient ∂L/∂v is projected to rank r and stepped by Adam in the subspace exactly as
GaLoreAdamW steps G (same basis refresh, moment policies, ``scale``); the magnitudes g have their own
Adam state (two vectors of length m). Since only v/‖v‖ matters, no copy of v is kept: each step
reads g_i = ‖W_i‖ and v̂_i = W_i/‖W_i‖ from the weight itself (so ‖v‖ = 1 and ∂L/∂v_i = g_i (G_i −
⟨G_i, v̂_i⟩ v̂_i)), updates them and writes W_i = g_i' · v_i'/‖v_i'‖ back. Where this differs from
the reference code: the radial term is kept (the reference drops it), no second full-size weight is
stored, and ‖v‖ is renormalised to 1 every step rather than drifting (Adam's update is scale-free,
so this only fixes the direction's effective step size to lr·scale). Weight decay multiplies the
magnitudes by (1 − lr·wd), which is W ← (1 − lr·wd)W. A row with zero norm has no direction; it
stays zero (no NaN). A magnitude stepped below zero moves its sign into the direction (g is re-read
as ‖W_i‖), so that row's Adam moments then push it back towards zero rather than through it.
"""

from __future__ import annotations

from .galore import GaLoreAdamW
from .rules.gradnorm import MAG_EXP_AVG, MAG_EXP_AVG_SQ, GradNormRule, weight_norm_gradients


class GradNormLoRPAdamW(GaLoreAdamW):
    """GaLoreAdamW on the direction of each row of the projected weights, with the row norms on
    their own Adam (``rules.gradnorm.GradNormRule``). Same arguments and group keys as GaLoreAdamW
    (``optim_bits`` included)."""

    rule = GradNormRule()


__all__ = ["MAG_EXP_AVG", "MAG_EXP_AVG_SQ", "GradNormLoRPAdamW", "weight_norm_gradients"]
