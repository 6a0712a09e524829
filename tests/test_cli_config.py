"""One definition of the optimizer settings: ``galorex.optim.config``'s dataclasses give
``TrainConfig``'s fields, ``galorex-train``'s flags (type, default, help, choices), the factory's
keywords and the validation; configurations saved by earlier versions still load and resume."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from problems import assert_same, tiny_train_args

from galorex.models.llama import Llama, get_config
from galorex.optim import config, registry
from galorex.optim.factory import available, build_optimizer
from galorex.train.checkpoint import load_checkpoint, save_checkpoint
from galorex.train.cli import build_parser, main
from galorex.train.config import (
    BEFORE_THE_SETTING,
    OPTIONS,
    TRAIN_DEFAULTS,
    TrainConfig,
    TrainError,
    check_config,
    flag,
)

pytestmark = pytest.mark.usefixtures("restore_torch_globals")

# config.json's "train" as galorex 0.2 wrote it (before the optimizer options were generated).
OLD_TRAIN_CONFIG = {
    "model": "llama-tiny",
    "optimizer": "galore",
    "rank": 8,
    "update_proj_gap": 100,
    "scale": 0.25,
    "proj_type": "std",
    "refresh_method": "svd",
    "moment_policy": "keep",
    "natural_history": 8,
    "natural_damping": 0.001,
    "optim_bits": 32,
    "basis_bits": 32,
    "basis_rotation": False,
    "lr": 0.003,
    "min_lr_ratio": 0.1,
    "warmup": 20,
    "weight_decay": 0.0,
    "beta1": 0.9,
    "beta2": 0.999,
    "grad_clip": 1.0,
    "batch_size": 4,
    "grad_accum": 1,
    "seq_len": 32,
    "dtype": "fp32",
    "steps": 2,
    "eval_every": 0,
    "eval_batches": 2,
    "log_every": 10,
    "save_every": 2,
    "keep_checkpoints": 3,
    "out": "runs/x",
    "resume": None,
    "seed": 0,
    "device": "auto",
    "data": None,
    "cache_dir": None,
    "dataset": None,
    "dataset_max_chars": 20000000,
    "tokenizer": None,
    "init_from": None,
    "halo": None,
    "halo_format": None,
    "halo_save_quantized": False,
    "sample_tokens": 8,
    "threads": 1,
    "progress": False,
    "layerwise": False,
    "distributed": "none",
    "dataset_config": None,
    "text_field": "text",
    "workers": None,
    "val_data": None,
    "val_split": None,
    "val_max_chars": 5000000,
    "report_to": "none",
    "compile": False,
    "recipe": None,
    "vocab_size": None,
    "activation_checkpointing": False,
    "force": False,
    "save_model": True,
}


def test_an_old_config_dict_loads_and_new_settings_take_their_defaults():
    cfg = TrainConfig.from_dict(OLD_TRAIN_CONFIG)
    assert cfg == TrainConfig(**{**BEFORE_THE_SETTING, **OLD_TRAIN_CONFIG})
    saved = cfg.to_dict()
    assert {k: saved[k] for k in OLD_TRAIN_CONFIG} == OLD_TRAIN_CONFIG
    for key in set(saved) - set(OLD_TRAIN_CONFIG):  # settings newer than that file: as runs had them then
        assert saved[key] == BEFORE_THE_SETTING.get(key, TrainConfig().to_dict()[key]), key
    assert cfg.refresh_schedule == "together" != TrainConfig().refresh_schedule
    assert TrainConfig.from_dict(json.loads(json.dumps(saved))) == cfg
    with pytest.raises(TrainError, match="'nope'"):
        TrainConfig.from_dict({**OLD_TRAIN_CONFIG, "nope": 1})


def test_every_option_is_a_field_a_flag_and_a_factory_keyword():
    names = [o.name for o in config.options()]
    assert names == [o.name for o in OPTIONS]
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert fields[:2] == ["model", "optimizer"] and fields[2 : 2 + len(names)] == names
    cfg = TrainConfig()
    assert list(cfg.option_values()) == names
    defaults = vars(build_parser().parse_args([]))
    for o in OPTIONS:
        assert o.help, o.name
        expected = TRAIN_DEFAULTS.get(o.name, o.default)
        assert getattr(cfg, o.name) == expected and defaults[o.name] == expected, o.name
    # the dataclasses come back whole
    assert cfg.projection == config.ProjectionConfig(rank=32, update_proj_gap=100, scale=None)
    assert cfg.refresh == config.RefreshConfig(refresh_schedule="staggered")  # galorex-train's default
    assert cfg.precision == config.StatePrecision()
    assert cfg.rule_options == config.RuleOptions()


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_each_flag_sets_its_field(option):
    if option.type is bool:
        argv, value = [flag(option.name)], True
    elif option.choices:
        value = next(c for c in option.choices if c != TRAIN_DEFAULTS.get(option.name, option.default))
        argv = [flag(option.name), str(value)]
    else:
        value = option.type(3)
        argv = [flag(option.name), str(value)]
    cfg = TrainConfig(**vars(build_parser().parse_args(argv)))
    assert getattr(cfg, option.name) == value
    assert cfg.option_values()[option.name] == value


def test_choices_are_what_the_validators_accept():
    bad = config.bad_key({}, 0)
    for name, choices in config.CHOICES.items():
        option = next(o for o in OPTIONS if o.name == name)
        for value in choices:
            config.validate_options(
                {"rank": 4, name: value, **({"basis_bits": 4} if name == "basis_rotation" else {})}, bad
            )
        wrong = "nope" if option.type is str else 7
        with pytest.raises(ValueError, match=name):
            config.validate_options({"rank": 4, name: wrong}, bad)


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"rank": 0}, ["--rank", "positive integer"]),
        ({"update_proj_gap": -1}, ["--update-proj-gap"]),
        ({"scale": float("nan")}, ["--scale"]),
        ({"proj_type": "diagonal"}, ["--proj-type", "'diagonal'"]),
        ({"oversample": -1}, ["--oversample"]),
        ({"basis_bits": 16}, ["--basis-bits"]),
        ({"basis_rotation": True}, ["--basis-rotation", "--basis-bits 4 or 8"]),
        ({"batch_size": 0}, ["--batch-size"]),
    ],
)
def test_validation_names_the_flag(change, needles):
    with pytest.raises(TrainError) as e:
        check_config(TrainConfig(**change))
    for needle in needles:
        assert needle in str(e.value)


def test_scale_none_is_the_optimizers_own_and_passes_validation():
    check_config(TrainConfig(scale=None, optimizer="apollo-mini"))


def test_rule_options_agree_with_the_rules_and_reach_only_them():
    for o in OPTIONS:
        if o.owner is not config.RuleOptions:
            continue
        takers = [n for n, cls in registry.OPTIMIZERS.items() if o.name in cls.rule.defaults]
        assert takers, f"{o.name}: no registered rule takes it"
        for n in takers:
            assert registry.OPTIMIZERS[n].rule.defaults[o.name] == o.default, (n, o.name)
    model = Llama(get_config("llama-tiny"))
    natural = build_optimizer("natural-galore", model, lr=1e-3, rank=4, natural_history=3, natural_damping=0.5)
    assert {g["natural_history"] for g in natural.param_groups} == {3}
    assert {g["natural_damping"] for g in natural.param_groups} == {0.5}
    galore = build_optimizer("galore", model, lr=1e-3, rank=4, natural_history=3, oversample=5)
    assert all("natural_history" not in g for g in galore.param_groups)
    assert [g.get("oversample") for g in galore.param_groups] == [16, 5]  # into the projected group only


def test_a_registered_optimizer_is_built_by_name():
    from galorex.optim.galore import GaLoreAdamW

    class Renamed(GaLoreAdamW):
        pass

    registry.register("galore-renamed", Renamed)
    try:
        assert "galore-renamed" in available()
        opt = build_optimizer("galore-renamed", Llama(get_config("llama-tiny")), lr=1e-3, rank=4, optim_bits=8)
        assert type(opt) is Renamed and opt.defaults["optim_bits"] == 8
    finally:
        del registry.OPTIMIZERS["galore-renamed"]
    with pytest.raises(ValueError, match="unknown optimizer 'galore-renamed'"):
        build_optimizer("galore-renamed", Llama(get_config("llama-tiny")), lr=1e-3)


def test_a_checkpoint_of_an_older_version_resumes_bit_for_bit(tmp_path, capsys):
    """A checkpoint whose config lacks the settings added since (oversample, power_iters,
    refresh_seed, proj_precision, refresh_schedule) resumes, and continues as the straight run does
    (runs then refreshed together: the resumed run says so, as a run of that time did)."""
    argv = tiny_train_args() + ["--rank", "8", "--update-proj-gap", "2", "--steps", "4", "--save-every", "2"]
    argv += ["--refresh-schedule", "together"]
    argv += ["--eval-every", "0", "--warmup", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(argv + ["--out", str(a)]) == 0
    shutil.copytree(a, b)
    (b / "checkpoints" / "ckpt-00000004.pt").unlink()
    (b / "summary.json").unlink()
    path = b / "checkpoints" / "ckpt-00000002.pt"
    ckpt = load_checkpoint(path)
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k in OLD_TRAIN_CONFIG}
    path.unlink()
    save_checkpoint(ckpt, b / "checkpoints", 2)
    # galorex-train's default is staggered now: resuming without the flag names the difference.
    plain = [a for a in argv if a not in ("--refresh-schedule", "together")]
    assert main(plain + ["--out", str(b), "--resume"]) == 2
    assert "trained with refresh_schedule='together', this run asks for refresh_schedule='staggered'" in (
        capsys.readouterr().err
    )
    assert main(argv + ["--out", str(b), "--resume"]) == 0
    assert "at step 2" in capsys.readouterr().out
    ca = load_checkpoint(a / "checkpoints" / "ckpt-00000004.pt")
    cb = load_checkpoint(b / "checkpoints" / "ckpt-00000004.pt")
    for key in ("model", "optimizer", "scheduler", "data", "rng"):
        assert_same(ca[key], cb[key], key)
    assert ca["step"] == cb["step"] == 4


def test_every_recipe_is_a_valid_config():
    from galorex.train.recipes import RECIPES, recipe_settings

    for name in RECIPES:
        cfg = TrainConfig(**recipe_settings(name))
        check_config(dataclasses.replace(cfg, lr=cfg.lr or 1e-3, scale=cfg.scale or 0.25))
        parser = build_parser()  # as main() applies a recipe: its settings become the defaults
        parser.set_defaults(**recipe_settings(name))
        assert TrainConfig(**vars(parser.parse_args(["--recipe", name]))) == dataclasses.replace(cfg, recipe=name)
