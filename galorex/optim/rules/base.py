"""The rule protocol: what runs inside the subspace, as a value the step loop is given.

The loop (``galorex.optim.lowrank``) owns everything around a rule — which parameters refresh, the
SVD, projecting, storing state in 8 bits, projecting back, decoupled decay, layer-wise hooks,
placement and checkpoints — and knows nothing of Adam. A rule owns its hyperparameters and its
state: it says what state it keeps and how it initialises, resets and carries it into a new basis,
how it turns low-rank gradients into directions, and how it steps parameters that are not
projected. It sees float tensors only: the loop loads the entries named by :meth:`Rule.moment_keys`
through the state codec before calling it and stores them back after.

A new optimizer is a rule plus a thin binding (``LowRankOptimizer`` subclass with ``rule = ...``);
docs/rules.md walks through a complete one (momentum SGD in the subspace, under 60 lines).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ... import projection as proj
from .. import config
from ..config import Bad

State = dict[str, Any]


class Step(NamedTuple):
    """One parameter's update: W ← decay·W + alpha·project_back(direction).

    Attributes:
        direction: the low-rank direction D (the low-rank gradient's shape).
        decay: the factor of W (1 − lr·wd for decoupled decay); a 0-dim tensor in a compiled step.
        alpha: the factor of the projected-back D (−lr·scale for Adam).
        extra: anything else the rule's own :meth:`Rule.write` needs (Fira and APOLLO: the
            low-rank gradient).
    """

    direction: torch.Tensor
    decay: float | torch.Tensor | None
    alpha: float | torch.Tensor | None
    extra: Any = None


class Rule:
    """Base class and documentation of the protocol; every method has a default a rule may keep.

    Attributes:
        name: the optimizer's name in the registry (``galorex-train --optimizer``).
        defaults: the rule's own group keys and their defaults (``lr`` included).
        shard_local: what the FSDP2 placement (``galorex.optim.sharded``) may compute on each
            rank's rows alone: ``"subspace"`` — :meth:`gradient` and :meth:`write` act row by row
            and :meth:`steps` reads only the low-rank gradients and states (W and G then stay
            sharded); ``"dense"`` — :meth:`step_dense` is elementwise. Whatever is not declared is
            computed on the whole matrix, gathered, which is always correct. A subclass that
            overrides one of these methods loses the declaration unless it repeats it.
        keeps_dense_state_dtype: load unprojected state in its saved dtype instead of the
            parameter's (torch's policy, the default, casts it to the parameter's dtype).
    """

    name = "rule"
    defaults: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.0}
    shard_local: frozenset[str] = frozenset()
    keeps_dense_state_dtype = False

    # ------------------------------------------------------------------ settings
    def validate(self, group: dict[str, Any], bad: Bad) -> None:
        """Check the rule's own group keys (the loop checks projection and precision keys).

        Args:
            group: the parameter group, defaults filled in.
            bad: ``bad(key, message)`` builds the ValueError to raise, naming the group and key.
        """
        config.check_lr(group, bad)
        config.check_weight_decay(group, bad)

    def check_sharding(self, group: dict[str, Any], where: str) -> None:
        """Refuse group settings the FSDP2 placement cannot serve (at construction, and at every
        step, since parameters may become DTensors later). Default: none; every rule and setting
        runs on FSDP2 parameters.

        Args:
            group: the parameter group.
            where: how the error names the group (``"param_groups[i]"``).

        Raises:
            ValueError: naming the group key and the reason.
        """

    # ------------------------------------------------------------------ subspace state
    def moment_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """State entries the codec may store in 8 bits (``optim_bits=8``)."""
        return ()

    def init_state(
        self, group: dict[str, Any], p: torch.Tensor, state: State, shape: tuple[int, ...], dtype: torch.dtype
    ) -> None:
        """Create the subspace state (in ``dtype``, on ``p``'s device) of parameter ``p``, whose
        low-rank gradient has ``shape``.

        Args:
            group: the parameter's group.
            p: the parameter (its local shard under FSDP2).
            state: its state dict, to fill in place (the loop adds steps and bases itself).
            shape: the low-rank gradient's shape (:func:`galorex.projection.lowrank_shape`).
            dtype: the compute dtype (float32, or float64 for float64 weights).
        """

    def reset(self, group: dict[str, Any], state: State) -> None:
        """``moment_policy="reset"``: forget what the state learnt in the old basis."""

    def reproject(self, group: dict[str, Any], state: State, transitions: list[torch.Tensor], side: str) -> None:
        """``moment_policy="reproject"``: carry the state into the new basis.

        Args:
            group: the parameter's group.
            state: its state (moments loaded as float tensors); update or replace entries.
            transitions: Rᵢ = P_newᵢᵀ P_oldᵢ per basis (:func:`galorex.projection.transition_matrices`).
            side: "left", "right" or "full".
        """

    def on_refresh(
        self,
        group: dict[str, Any],
        state: State,
        old_bases: list[torch.Tensor],
        new_bases: list[torch.Tensor],
        side: str,
    ) -> None:
        """A parameter's basis changes (not at its first one): apply the group's moment policy
        (``keep``: nothing; ``reset``: :meth:`reset`; ``reproject``: :meth:`reproject`).

        Args:
            group: the parameter's group.
            state: its state.
            old_bases, new_bases: the bases before and after the refresh (float).
            side: "left", "right" or "full".
        """
        policy = group[config.MOMENT_POLICY]
        if policy == "reset":
            self.reset(group, state)
        elif policy == "reproject":
            self.reproject(group, state, proj.transition_matrices(old_bases, new_bases), side)

    # ------------------------------------------------------------------ generated bases
    def basis_is_generated(self, group: dict[str, Any]) -> bool:
        """True when the rule draws its projection from a seed instead of the gradient's SVD
        (APOLLO's random projection): the loop then stores no basis, calls :meth:`init_projection`
        and :meth:`advance_projection` on its refresh schedule, and :meth:`make_bases` every step."""
        return False

    def init_projection(self, group: dict[str, Any], p: torch.Tensor, state: State, index: int) -> None:
        """Set up a generated projection's seed for the parameter at ``index`` (over all groups)."""
        raise NotImplementedError(f"{type(self).__name__} does not generate its bases")

    def advance_projection(self, group: dict[str, Any], p: torch.Tensor, state: State) -> None:
        """Move a generated projection to its next seed (at a refresh step)."""
        raise NotImplementedError(f"{type(self).__name__} does not generate its bases")

    def make_bases(self, group: dict[str, Any], p: torch.Tensor, state: State, side: str) -> list[torch.Tensor]:
        """The generated projection of this step (from the seed in ``state``)."""
        raise NotImplementedError(f"{type(self).__name__} does not generate its bases")

    def bias_step(self, group: dict[str, Any], state: State) -> int | torch.Tensor:
        """Steps the current state has seen (restarting at a reset refresh); a tensor inside a
        compiled step, where reading it would break the graph."""
        if torch.compiler.is_compiling():
            if group[config.MOMENT_POLICY] == "reset":
                return state[config.STEP] - state[config.PROJ_STEP]
            return state[config.STEP]
        step = int(state[config.STEP].item())
        if group[config.MOMENT_POLICY] == "reset":
            return step - int(state[config.PROJ_STEP].item())
        return step

    # ------------------------------------------------------------------ the step
    def gradient(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The (m×n) matrix that is projected (and whose SVD gives the basis), and a record the
        rule's :meth:`write` receives back (GradNormLoRP's magnitude gradient). Default: the
        gradient as a matrix in the compute dtype, no record.

        Args:
            group: the parameter's group.
            p: the parameter.
            grad: its gradient.
        """
        return proj.as_matrix(grad).to(config.compute_dtype(p.dtype)), None

    def steps(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        weights: list[torch.Tensor],
        lows: list[torch.Tensor],
        states: list[State],
    ) -> list[Step]:
        """Low-rank gradients → updates, for a group's projected parameters at once.

        Args:
            group: the group.
            params: its projected parameters that have a gradient this step.
            weights: the same parameters as (m×n) matrices.
            lows: their low-rank gradients R = project(gradient(...)).
            states: their states (moments loaded as float tensors), updated in place or with
                entries replaced; the loop stores them back.

        Returns:
            One :class:`Step` per parameter.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define steps()")

    def write(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        state: State,
        step: Step,
        bases: list[torch.Tensor],
        side: str,
        record: Any,
    ) -> None:
        """Apply one update to the weight (default: decay and back-projection in one GEMM,
        :func:`apply_lowrank_update`).

        Args:
            group: the parameter's group.
            p: the parameter, updated in place.
            state: its state.
            step: the :class:`Step` :meth:`steps` returned for it.
            bases: the bases it was projected with.
            side: "left", "right" or "full".
            record: what :meth:`gradient` returned beside the matrix.
        """
        apply_lowrank_update(p, step.direction, bases, side, decay=step.decay, alpha=step.alpha)

    def step_dense(self, group: dict[str, Any], params: list[torch.Tensor], state_of: Any, compiled: Any) -> None:
        """Step unprojected parameters (groups without ``rank``, and 1-D parameters).

        Args:
            group: their group.
            params: the parameters with a gradient (in ``p.grad``).
            state_of: ``state_of[p]`` is a parameter's state dict (created empty).
            compiled: ``compiled(key, fn)`` is ``fn`` compiled when the optimizer was built with
                ``compile``, else ``fn``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not step unprojected parameters")

    # ------------------------------------------------------------------ memory
    def check_params(self, group: dict[str, Any], index: int, label: Any) -> None:
        """Refuse, at construction, parameters the rule cannot step (``label(i)`` names the i-th)."""

    def state_bytes(
        self,
        group: dict[str, Any],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        low_shape: tuple[int, ...] | None = None,
    ) -> int:
        """Bytes of the rule's state for one parameter: its subspace state when ``low_shape`` is
        given, its unprojected state otherwise. The loop adds the bases and step counters
        (``galorex.memory`` asks this).

        Args:
            group: the group's settings (``optim_bits`` and the rule's keys).
            shape, dtype: the parameter's.
            low_shape: the low-rank gradient's shape, or None for an unprojected parameter.
        """
        return 0


def apply_lowrank_update(
    p: torch.Tensor,
    d: torch.Tensor,
    bases: list[torch.Tensor],
    side: str,
    *,
    decay: float | torch.Tensor,
    alpha: float | torch.Tensor,
) -> None:
    """W ← decay·W + alpha·project_back(D): one GEMM into the weight when it is contiguous and in
    the compute dtype; otherwise on a compute-dtype copy, rounded once.

    Args:
        p: the parameter, updated in place.
        d: the low-rank direction D (compute dtype).
        bases, side: as :func:`galorex.projection.project`.
        decay, alpha: numbers, or 0-dim tensors in a compiled step (then alpha scales the small D
            and the decay multiplies W in place, since ``addmm_`` takes numbers only).
    """
    if isinstance(decay, torch.Tensor) or isinstance(alpha, torch.Tensor):
        # Tensor hyperparameters (compiled step): scale the small low-rank D instead of passing
        # alpha to addmm (which takes numbers only), and decay in place.
        in_place = p.dtype == d.dtype and p.is_contiguous()
        w = proj.as_matrix(p) if in_place else proj.as_matrix(p).to(d.dtype, copy=True)
        w.mul_(decay)
        proj.add_projected_back_(w, d * alpha, bases, side, alpha=1.0)
        if not in_place:
            p.copy_(w.view_as(p))
        return
    if p.dtype == d.dtype and p.is_contiguous():
        proj.add_projected_back_(proj.as_matrix(p), d, bases, side, alpha=alpha, beta=decay)
    else:
        w = proj.as_matrix(p).to(d.dtype)
        proj.add_projected_back_(w, d, bases, side, alpha=alpha, beta=decay)
        p.copy_(w.view_as(p))


__all__ = ["Rule", "State", "Step", "apply_lowrank_update"]
