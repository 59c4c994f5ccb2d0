"""Training configs compose the model's and the augmentation's configs: one set of defaults, every field
reachable from the CLI, TOML files and sweep files, and run folders written before a setting existed resume."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cifarray.config import from_dict, to_dict
from cifarray.data.augment import AugmentConfig
from cifarray.errors import UserError
from cifarray.models.dcgan import DCGANConfig
from cifarray.models.densenet import PRESETS, DenseNetConfig, param_count
from cifarray.train import runfolder
from cifarray.train.__main__ import parse
from cifarray.train.config import AUGMENT_KEYS, DCGAN_KEYS, DENSENET_KEYS, DCGANTrainConfig, DenseNetTrainConfig
from cifarray.tune.sweep import parse as parse_sweep

NOT_SETTINGS = {"num_classes", "in_channels"}  # fixed by CIFAR-100, not user settings


def _fields(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("component, train, mapping", [
    (DenseNetConfig, DenseNetTrainConfig, {k: k for k in DENSENET_KEYS}),
    (AugmentConfig, DenseNetTrainConfig, AUGMENT_KEYS),
    (DCGANConfig, DCGANTrainConfig, {k: k for k in DCGAN_KEYS}),
])
def test_every_component_field_is_a_training_setting_with_the_components_default(component, train, mapping):
    assert set(mapping) == set(_fields(component)) - NOT_SETTINGS
    inner, outer = _fields(component), _fields(train)
    for name, key in mapping.items():
        assert outer[key].default == inner[name].default, key
        assert outer[key].metadata["help"] == inner[name].metadata["help"], key


def test_the_default_training_model_is_the_paper_model():
    cfg = DenseNetTrainConfig(synthetic=True)
    assert cfg.model_config() == DenseNetConfig() == PRESETS["paper"]
    assert param_count(cfg.model_config()) == 99_735


def test_every_augmentation_field_is_reachable_from_the_command_line():
    cfg = parse(["densenet", "--synthetic", "--augment", "basic", "--crop-pad", "2", "--no-flip", "--augmix-severity",
                 "5", "--augmix-width", "2", "--augmix-depth", "1", "--augmix-alpha", "0.5"]).cfg
    assert cfg.augment_config() == AugmentConfig(mode="basic", pad=2, flip=False, severity=5, width=2, depth=1,
                                                 alpha=0.5)


def test_augmentation_fields_in_toml_and_sweep_files(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("synthetic = true\ncrop_pad = 0\naugmix_alpha = 2.0\nflip = false\n")
    cfg = parse(["densenet", "--config", str(f)]).cfg
    assert (cfg.augment_config().pad, cfg.augment_config().alpha, cfg.augment_config().flip) == (0, 2.0, False)
    sweep = parse_sweep({"model": "densenet", "train": {"crop_pad": 2, "steps": 100, "eval_every": 50},
                         "space": {"augmix_alpha": {"uniform": [0.5, 2.0]}, "augmix_depth": {"choice": [1, 3]},
                                   "num_blocks": {"int": [2, 3]}, "layers_per_block": {"int": [1, 2]}}}, "s.toml")
    trial = sweep.config_for(sweep.overrides({"augmix_alpha": 1.5, "augmix_depth": 3, "num_blocks": 2,
                                              "layers_per_block": 1, "layers_0": 1, "layers_1": 2}))
    assert trial.augment_config() == AugmentConfig(pad=2, alpha=1.5, depth=3) and trial.blocks == (1, 2)


@pytest.mark.parametrize("args, message", [
    (["--augmix-depth", "0"], "depth -1 (random 1..3) or >= 1"),
    (["--crop-pad", "20"], "augment pad 20 must be between 0 and 16 pixels"),
    (["--augment", "fancy"], "--augment 'fancy' is not one of none, basic, augmix"),
])
def test_bad_augmentation_settings_are_user_errors(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse(["densenet", "--synthetic", *args])


def test_a_run_folder_written_before_a_setting_existed_resumes_and_a_changed_one_is_refused(tmp_path):
    cfg = DenseNetTrainConfig(synthetic=True, out=str(tmp_path))
    old = {k: v for k, v in to_dict(cfg).items() if k not in ("crop_pad", "augmix_depth", "augmix_alpha", "flip")}
    (tmp_path / "config.json").write_text(json.dumps(old | {"out": str(tmp_path)}))
    (tmp_path / "summary.json").write_text(json.dumps({"status": "complete"}))
    run, resolved, done = runfolder.prepare_run(cfg)
    assert done  # the old run used today's defaults for the settings it did not record
    assert from_dict(DenseNetTrainConfig, old) == dataclasses.replace(cfg, out=old["out"])
    changed = dataclasses.replace(cfg, augmix_alpha=2.0)
    with pytest.raises(UserError, match=r"holds a run with other settings \(augmix_alpha: 1.0 -> 2.0\)"):
        runfolder.prepare_run(changed)


def test_a_config_with_a_setting_this_version_does_not_know_is_refused():
    with pytest.raises(UserError, match="setting\\(s\\) warp_drive that this version of cifarray does not know"):
        from_dict(DenseNetTrainConfig, {"synthetic": True, "warp_drive": 1})


def test_a_run_resumed_with_another_cpu_count_continues(tmp_path):
    """A sweep resumed on another allocation recomputes each trial's cpus_per_worker; its unfinished trials used
    to be refused as "a run with other settings". The CPU count says how a run is run, not what it trains."""
    cfg = DenseNetTrainConfig(synthetic=True, synthetic_train_per_class=2, synthetic_test_per_class=1, val_size=10,
                              out=str(tmp_path), cpus_per_worker=1)
    runfolder.prepare_run(cfg)
    run, resolved, done = runfolder.prepare_run(dataclasses.replace(cfg, cpus_per_worker=4))
    assert not done and resolved["cpus_per_worker"] == 4
    with pytest.raises(UserError, match="holds a run with other settings"):  # a training setting still differs
        runfolder.prepare_run(dataclasses.replace(cfg, lr=0.5))
