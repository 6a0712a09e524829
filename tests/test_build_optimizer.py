"""galorex.build_optimizer(name, model, **settings): every name galorex-train takes, its default
learning rate, errors that list what is allowed; and the warning for a near-miss group key."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import galorex
from galorex.models.llama import build_llama, get_config
from galorex.optim.factory import DEFAULT_LR, available

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name", available())
def test_every_name_builds_with_its_default_lr_and_steps(name):
    model = build_llama(get_config("llama-tiny"), seed=0)
    opt = galorex.build_optimizer(name, model, rank=8)
    assert opt.param_groups[0]["lr"] == DEFAULT_LR[name]
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    model(x, x)[1].backward()
    opt.step()
    assert opt.state


def test_unknown_names_and_settings_list_what_is_allowed():
    model = build_llama(get_config("llama-tiny"), seed=0)
    with pytest.raises(ValueError, match="unknown optimizer 'galor'; available: adamw, galore"):
        galorex.build_optimizer("galor", model)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['update_proj_gpa'\]") as e:
        galorex.build_optimizer("galore", model, update_proj_gpa=5)
    assert "(did you mean 'update_proj_gpa' → 'update_proj_gap'?)" in str(e.value)
    assert "'optim_bits'" in str(e.value) and "'lr'" in str(e.value)


def test_a_near_miss_key_in_a_projected_group_warns_naming_both():
    p = nn.Parameter(torch.zeros(8, 8))
    with pytest.warns(UserWarning, match="'update_proj_gpa'.*did you mean 'update_proj_gap'.*update_proj_gap=200"):
        galorex.GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gpa": 5}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Keys other libraries use, and any key of a group without rank, pass quietly.
        galorex.GaLoreAdamW([{"params": [p], "rank": 2, "name": "w", "lr_scale": 0.5, "layer_id": 3}])
        galorex.GaLoreAdamW([{"params": [p], "update_proj_gpa": 5}])


def test_the_warning_points_at_the_callers_line():
    p = nn.Parameter(torch.zeros(8, 8))
    with pytest.warns(UserWarning) as record:
        galorex.FiraAdamW([{"params": [p], "rank": 2, "proj_typ": "left"}])
    assert record[0].filename == __file__
