"""GradNormLoRPAdamW ("Gradient Weight-normalized Low-rank Projection for Efficient LLM Training"):
the step loop with the GradNormLoRP rule (``rules.gradnorm``, where the maths is written out:
each projected weight's rows read as magnitude · unit direction, GaLore's Adam on the direction
gradient, a separate Adam on the magnitudes)."""

from __future__ import annotations

from .galore import GaLoreAdamW
from .rules.gradnorm import MAG_EXP_AVG, MAG_EXP_AVG_SQ, GradNormRule, weight_norm_gradients


class GradNormLoRPAdamW(GaLoreAdamW):
    """GaLoreAdamW on the direction of each row of the projected weights, with the row norms on
    their own Adam (``rules.gradnorm.GradNormRule``).

    Args:
        Those of :class:`GaLoreAdamW`, with the same group keys (``optim_bits`` included);
        FSDP2 (DTensor) parameters are stepped as in one process (``galorex.optim.sharded``).
    """

    rule = GradNormRule()


__all__ = ["MAG_EXP_AVG", "MAG_EXP_AVG_SQ", "GradNormLoRPAdamW", "weight_norm_gradients"]
