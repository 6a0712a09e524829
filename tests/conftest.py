"""Shared test configuration: hypothesis profiles and small helpers.

``HYPOTHESIS_PROFILE=dev`` runs more (random) examples locally; CI uses the derandomized "ci"
profile so every run sees the same examples.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Make ``tests/reference_galore.py`` importable as ``reference_galore`` however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parent))

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=200,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny-matrix tests on one intra-op thread and restore the count afterwards.

    The matrices here are a few dozen rows: threading buys nothing, and on a shared 2-core machine
    an OpenMP team waiting for a busy core makes each small op take milliseconds instead of
    microseconds. Used by the optimizer test modules with ``pytestmark``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def restore_torch_globals():
    """galorex-train sets torch's thread count and global RNG; give the next test its own back.
    Used by the training-command test modules with ``pytestmark``."""
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
