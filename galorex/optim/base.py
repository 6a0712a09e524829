"""Import path of galorex 0.1 for the step loop and its helpers, kept so code written against it
works: the loop now lives in ``lowrank``, settings in ``config``, state storage in ``codec``."""

from __future__ import annotations

from .codec import basis_keys, load_bases, load_moment, store_bases, store_moment
from .config import (
    BASIS_BITS,
    BASIS_ROTATION,
    EPS_MODE,
    EPS_MODES,
    MOMENT_POLICIES,
    MOMENT_POLICY,
    OPTIM_BITS,
    OVERSAMPLE,
    POWER_ITERS,
    PROJ_STEP,
    PROJ_TYPE,
    RANK,
    REFRESH_METHOD,
    REFRESH_SEED,
    SCALE,
    STEP,
    UPDATE_PROJ_GAP,
    CompileOption,
    compute_dtype,
    hyperparameter,
)
from .config import mix_seed as _mix_seed
from .lowrank import LowRankOptimizer

__all__ = [
    "BASIS_BITS",
    "BASIS_ROTATION",
    "EPS_MODE",
    "EPS_MODES",
    "MOMENT_POLICIES",
    "MOMENT_POLICY",
    "OPTIM_BITS",
    "OVERSAMPLE",
    "POWER_ITERS",
    "PROJ_STEP",
    "PROJ_TYPE",
    "RANK",
    "REFRESH_METHOD",
    "REFRESH_SEED",
    "SCALE",
    "STEP",
    "UPDATE_PROJ_GAP",
    "CompileOption",
    "LowRankOptimizer",
    "_mix_seed",
    "basis_keys",
    "compute_dtype",
    "hyperparameter",
    "load_bases",
    "load_moment",
    "store_bases",
    "store_moment",
]
