"""Config files that extend one another, and the packaged HeBA configs built that way."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vladapt.config import from_mapping, load_config, to_dict
from vladapt.engine.runconfig import resolve_run_config
from vladapt.engine.train import TrainConfig
from vladapt.errors import ConfigError
from vladapt.methods.heba import HeBAConfig

# The packaged files as they were written out in full before they extended one another.
_B2N_METHOD = {"adapter_start": 1, "adapter_end": None, "towers": ["visual", "text"],
               "positions": ["attn_in", "mlp_hidden"], "reduction": 4, "scale": 0.025, "scale_factor": 2.25,
               "slow_fast_ratio": 0.8, "eval_scale": None, "new_eval_scale": None, "neg_sampling_ratio": 5,
               "label_smoothing": 0.1, "text_prefix": "a photo of a", "descriptions": None,
               "strict_descriptions": True, "reference_prompts": False, "text_batch_size": 256}
_B2N_TRAIN = {"optimizer": "sgd", "lr": 0.0075, "momentum": 0.9, "weight_decay": 0.0005, "epochs": 30,
              "batch_size": 16, "scheduler": "cosine", "warmup_epochs": 0, "precision": "auto"}
_XD = {"method": {"adapter_start": 9, "adapter_end": 12, "scale": 0.05, "scale_factor": 10.0, "slow_fast_ratio": 0.8,
                  "neg_sampling_ratio": 5},
       "train": {"optimizer": "sgd", "lr": 0.0065, "momentum": 0.9, "weight_decay": 0.0005, "epochs": 10,
                 "batch_size": 64, "scheduler": "cosine", "warmup_epochs": 0, "precision": "auto"}}
BEFORE = {
    "base2new": {"method": _B2N_METHOD, "train": _B2N_TRAIN},
    "cross_dataset": _XD,
    "dg": _XD,  # dg.yaml was a copy of cross_dataset.yaml
    "demo": {"method": {"adapter_start": 1, "adapter_end": None, "towers": ["visual", "text"],
                        "positions": ["attn_in", "mlp_hidden"], "reduction": 4, "scale": 0.1, "scale_factor": 2.25,
                        "slow_fast_ratio": 0.8, "eval_scale": None, "new_eval_scale": None, "neg_sampling_ratio": 5,
                        "label_smoothing": 0.1, "text_prefix": "a photo of a", "descriptions": None,
                        "strict_descriptions": True, "reference_prompts": False, "text_batch_size": 256},
             "train": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0005, "epochs": 30,
                       "batch_size": 16, "scheduler": "cosine", "warmup_epochs": 0, "crop_scale": [1.0, 1.0],
                       "precision": "auto"}},
    "fewshot": {"method": {}, "train": _B2N_TRAIN},
}


@pytest.mark.parametrize("protocol", sorted(BEFORE))
def test_packaged_heba_configs_resolve_to_their_former_values(protocol):
    method_cfg, train_cfg = resolve_run_config("heba", protocol)
    before = BEFORE[protocol]
    assert method_cfg == to_dict(from_mapping(HeBAConfig, before["method"], "method."))
    assert train_cfg == from_mapping(TrainConfig, before["train"], "train.")


def test_demo_config_changes_three_base2new_values():
    b2n, b2n_train = resolve_run_config("heba", "base2new")
    demo, demo_train = resolve_run_config("heba", "demo")
    assert {k: v for k, v in demo.items() if b2n[k] != v} == {"scale": 0.1}
    changed = {k: v for k, v in to_dict(demo_train).items() if to_dict(b2n_train)[k] != v}
    assert changed == {"lr": 0.1, "crop_scale": [1.0, 1.0]}


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_chains_deep_merge_relative_to_each_file(tmp_path):
    write(tmp_path / "base.yaml", "method: {scale: 0.025, towers: [visual, text]}\ntrain: {lr: 0.01, epochs: 30}\n")
    write(tmp_path / "mid" / "mid.yaml", "extends: ../base.yaml\ntrain: {epochs: 5}\n")
    child = write(tmp_path / "mid" / "deep" / "child.yaml",
                  "extends: ../mid.yaml\nmethod: {towers: [visual]}\ntrain: {batch_size: 8}\n")
    assert load_config(child) == {"method": {"scale": 0.025, "towers": ["visual"]},
                                  "train": {"lr": 0.01, "epochs": 5, "batch_size": 8}}
    # a user's --config file may extend too; overrides still apply last
    method_cfg, train_cfg = resolve_run_config("heba", "base2new", path=child, overrides=["train.lr=0.5"])
    assert method_cfg["scale"] == 0.025 and method_cfg["towers"] == ["visual"]
    assert (train_cfg.lr, train_cfg.epochs, train_cfg.batch_size) == (0.5, 5, 8)


def test_extends_errors_name_the_files(tmp_path):
    a = write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: c.yaml\n")
    write(tmp_path / "c.yaml", "extends: b.yaml\ntrain: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"cycle: \S*b\.yaml -> \S*c\.yaml -> \S*b\.yaml"):
        load_config(a)
    own = write(tmp_path / "own.yaml", "extends: own.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: \S*own\.yaml -> \S*own\.yaml"):
        load_config(own)
    orphan = write(tmp_path / "orphan.yaml", "extends: gone/parent.yaml\n")
    with pytest.raises(ConfigError, match=r"orphan\.yaml extends \S*gone/parent\.yaml, which does not exist"):
        load_config(orphan)
    listed = write(tmp_path / "listed.yaml", "extends: [a.yaml, b.yaml]\n")
    with pytest.raises(ConfigError, match=r"listed\.yaml: extends must be the file name of another config"):
        load_config(listed)
    # unknown top-level keys are errors naming the file they are in, also in a parent
    write(tmp_path / "bad_parent.yaml", "TRAINER: {LWEIB: {ADAPTER_SCALE: 0.05}}\n")
    child = write(tmp_path / "child.yaml", "extends: bad_parent.yaml\ntrain: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown section 'TRAINER' in config file \S*bad_parent\.yaml"):
        resolve_run_config("heba", "base2new", path=child)
    with pytest.raises(ConfigError, match=r"unknown section 'extends' in overrides"):
        resolve_run_config("heba", "base2new", overrides=["extends=base2new.yaml"])


# ------------------------------------------------------------------------ values users write on the command line
def test_scientific_notation_is_a_number_in_overrides_and_files(tmp_path):
    method, train = resolve_run_config("heba", "base2new", overrides=["train.lr=1e-3", "train.weight_decay=5E-4",
                                                                      "train.epochs=1e1", "method.scale=+2.5e-2"])
    assert train.lr == 0.001 and train.weight_decay == 0.0005 and train.epochs == 10 and method["scale"] == 0.025
    assert isinstance(train.epochs, int)
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e6\n")
    assert resolve_run_config("heba", "base2new", path)[1].lr == 1e6
    for bad, message in (("train.epochs=2.5", "train.epochs: expected an integer, got 2.5"),
                         ("train.lr=.inf", "train.lr: expected a finite number"),
                         ("train.lr=1e", "train.lr: expected a number, got '1e'")):
        with pytest.raises(ConfigError, match=message):
            resolve_run_config("heba", "base2new", overrides=[bad])


_keys = st.one_of(st.sampled_from([f.name for f in dataclasses.fields(TrainConfig)] +
                                  [f.name for f in dataclasses.fields(HeBAConfig)]),
                  st.text(max_size=8), st.integers(), st.none())
_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                   max_size=3), max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.dictionaries(_keys, _values, max_size=4), _values))
def test_any_mapping_is_a_config_or_a_config_error_naming_the_key(data):
    for cls, where in ((TrainConfig, "train."), (HeBAConfig, "method.")):
        try:
            from_mapping(cls, data, where)
        except ConfigError as e:
            msg = str(e)
            if isinstance(data, dict) and data:
                assert any(f"{where}{k}" in msg or repr(k) in msg for k in data), msg


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.text(max_size=12), max_size=4))
def test_any_override_text_parses_or_is_a_config_error(tokens):
    try:
        resolve_run_config("heba", "base2new", overrides=tokens)
    except ConfigError:
        pass
