"""Every shipped config loads into the typed config; overrides reject what they should."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gensr_ray.cli import main as gensr
from gensr_ray.config import ConfigError, GenSRConfig, apply_overrides, load_config
from gensr_ray.inputs.prompts import PROMPTS
from gensr_ray.model.gensr import SUBSPACES

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
TRAINING_CONFIGS = [p for p in CONFIGS if "sweeps" not in p.parts]
DEBUG_CONFIG = Path(__file__).parent.parent / "configs" / "debug.yaml"


def test_configs_are_found_in_subfolders_too():
    assert {p.parent.name for p in TRAINING_CONFIGS} >= {"configs", "paper", "gpu"}


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_loads_and_opens_with_its_command(path):
    cfg = load_config(path)
    assert cfg.model.prompt in PROMPTS
    assert cfg.model.subspace in SUBSPACES
    head = path.read_text().splitlines()[:12]
    assert head[0].startswith("#") and any("train --config" in line for line in head)


def test_overrides_are_typed_and_unknown_keys_fail(tmp_path):
    cfg = apply_overrides(GenSRConfig(), ["train.lr=3e-4", "model.lora_targets=[q, v]"])
    assert cfg.train.lr == 3e-4 and cfg.model.lora_targets == ["q", "v"]
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        apply_overrides(cfg, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        apply_overrides(cfg, ["train.epochs=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml: train: unknown key"):
        load_config(bad)


SWEEPS = sorted((Path(__file__).parent.parent / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_loads_and_every_trial_is_a_valid_override(path):
    from gensr_ray.study import load_sweep

    sweep = load_sweep(path)
    assert len(sweep.trials) >= 2 and sweep.mode in ("max", "min")  # a comparison
    assert any("gensr tune" in line for line in path.read_text().splitlines()[:4])


def test_shipped_sweeps_cover_prompts_subspaces_and_losses():
    assert {p.stem for p in SWEEPS} >= {"prompts", "subspaces", "losses"}


def test_bad_sweep_names_the_trial(tmp_path):
    from gensr_ray.study import load_sweep

    bad = tmp_path / "bad.yaml"
    bad.write_text("trials:\n  a: {model.nope: 1}\n")
    with pytest.raises(ConfigError, match="trial 'a'"):
        load_sweep(bad)


def test_trial_concurrency_follows_resources():
    from gensr_ray.study import max_concurrent_trials

    cpu = apply_overrides(GenSRConfig(), {"scale.num_workers": 2, "scale.cpus_per_worker": 0.5})
    assert max_concurrent_trials(cpu, {"CPU": 2.0}) == 1  # this machine: one after another
    assert max_concurrent_trials(cpu, {"CPU": 16.0}) == 10
    gpu = apply_overrides(GenSRConfig(), {"scale.num_workers": 4, "scale.use_gpu": True,
                                          "scale.cpus_per_worker": 4})
    assert max_concurrent_trials(gpu, {"CPU": 128.0, "GPU": 16.0}) == 4
    assert max_concurrent_trials(gpu, {"CPU": 8.0, "GPU": 16.0}) == 1
    # the Ray Data bundle counts: 2 x 0.5 + 4 + 0.1 CPUs a trial
    more_data = apply_overrides(cpu, {"scale.data_cpus": 4})
    assert max_concurrent_trials(more_data, {"CPU": 16.0}) == 3


@pytest.mark.parametrize("setting,value", [
    ("model.prompt", "authorz"), ("model.subspace", "lora"),
    ("scale.placement_strategy", "pack"), ("eval.split", "train"),
    ("data.prepare_if_missing", "amazon")])
def test_choice_settings_are_checked_when_the_config_loads(tmp_path, setting, value):
    """A wrong choice fails at load time, naming the setting and the valid choices, in the
    CLI's overrides, in config files and in sweep files alike."""
    from gensr_ray import config
    from gensr_ray.study import load_sweep

    field = setting.split(".")[1]
    choices = {"prompt": config.PROMPT_DESIGNS, "subspace": config.SUBSPACES,
               "placement_strategy": config.PLACEMENT_STRATEGIES, "split": config.SPLITS,
               "prepare_if_missing": config.DATASETS_TO_PREPARE}[field]
    shown = ", ".join(c for c in choices if c)
    with pytest.raises(ConfigError, match=f"{setting}={value!r} is not a valid choice.*{shown}"):
        apply_overrides(GenSRConfig(), [f"{setting}={value}"])
    section, key = setting.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=f"c.yaml: {setting}={value!r}"):
        load_config(path)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"trials:\n  bad: {{{setting}: {value}}}\n")
    with pytest.raises(ConfigError, match=f"trial 'bad': {setting}={value!r}"):
        load_sweep(sweep)


def test_the_choice_lists_are_what_the_modules_build():
    from gensr_ray import config

    assert tuple(PROMPTS) == config.PROMPT_DESIGNS
    assert tuple(SUBSPACES) == config.SUBSPACES


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=-5", "train.max_steps=-5 is out of range: must be -1"),
    ("train.batch_size=0", "train.batch_size=0 is out of range: must be >= 1"),
    ("train.lr=.nan", "train.lr=nan is out of range: must be > 0"),
    ("train.lr=-1e-4", "train.lr=-0.0001 is out of range"),
    ("scale.num_workers=-1", "scale.num_workers=-1 is out of range: must be >= 0"),
    ("scale.zero_stage=4", "scale.zero_stage=4 is out of range: must be 0, 1, 2 or 3"),
    ("loss.temperature=0", "loss.temperature=0.0 is out of range"),
    ("train.negative_popularity=-1", "train.negative_popularity=-1.0 is out of range"),
    ("train.negative_popularity=0.5", "weights the draws of fresh negatives: set "
                                      "train.negatives=fresh .got train.negatives='stored'"),
])
def test_numeric_settings_are_range_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        apply_overrides(GenSRConfig(), [override])


def test_every_range_names_a_real_setting_and_shipped_configs_are_in_range():
    from gensr_ray.config import RANGES

    data = GenSRConfig().to_dict()
    for key in RANGES:
        section, name = key.split(".")
        assert name in data[section], key
    for path in TRAINING_CONFIGS:
        load_config(path)  # raises on a value out of range


# a file that is not YAML, or asks for a Python object: one line naming the file and the line
BAD_YAML = {
    "indent": ("train:\n  lr: 0.001\n batch_size: 2\n", "line 3, column 2: not valid YAML"),
    "unclosed": ("model: {prompt: authors\ntrain:\n  lr: 1\n",
                 "line 2, column 6: not valid YAML"),
    "tab": ("train:\n\tlr: 1\n", "line 2, column 1: not valid YAML: found character '\\t'"),
    "python_tag": ("train:\n  lr: !!python/object/apply:os.system ['touch PWNED']\n",
                   "line 2, column 7: the tag !!python/object/apply:os.system is not allowed"),
}


def _one_line_error(capsys, path: Path, message: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}: {message}" in err, err


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_a_config_file_that_is_not_yaml_is_one_line_naming_file_and_line(tmp_path, capsys,
                                                                          monkeypatch, case):
    text, message = BAD_YAML[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    monkeypatch.chdir(tmp_path)  # where `touch PWNED` would have run
    code = gensr(["train", "--config", str(bad), "--out", str(tmp_path / "run")])
    assert code == 2
    _one_line_error(capsys, bad, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.mark.parametrize("case", [*sorted(BAD_YAML), "top_level_list", "trial_not_a_mapping"])
def test_a_sweep_file_that_is_not_yaml_is_one_line_naming_file_and_line(tmp_path, capsys, case):
    text, message = {
        **BAD_YAML,
        "top_level_list": ("- metric: mean/sampled/NDCG@10\n", "expected a mapping"),
        "trial_not_a_mapping": ("trials:\n  a: [model.prompt, minimal]\n",
                                "trial 'a': expected a mapping of overrides"),
    }[case]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text)
    code = gensr(["tune", "--config", str(DEBUG_CONFIG), "--sweep", str(sweep),
                  "--out", str(tmp_path / "study")])
    assert code == 2
    _one_line_error(capsys, sweep, message)
    assert not (tmp_path / "study").exists()


def test_an_override_that_is_not_yaml_is_a_config_error(tmp_path, capsys):
    code = gensr(["train", "--config", str(DEBUG_CONFIG), "--out", str(tmp_path / "run"),
                  "--set", "model.lora_targets=[q, v"])
    err = capsys.readouterr().err
    assert code == 2 and "override 'model.lora_targets=[q, v': not valid YAML" in err, err
    with pytest.raises(ConfigError, match="the tag !!python/name:os.system is not allowed"):
        apply_overrides(GenSRConfig(), ["train.lr=!!python/name:os.system"])


def test_config_show_prints_the_resolved_config_and_help_lists_every_setting(capsys):
    from gensr_ray.config import describe_settings

    assert gensr(["config", "show", "--config", str(DEBUG_CONFIG), "--set", "train.lr=3e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 3e-4 and shown["model"]["prompt"] == "minimal"
    assert apply_overrides(GenSRConfig(), {}).to_dict().keys() == shown.keys()
    assert gensr(["config", "help"]) == 0
    text = capsys.readouterr().out
    keys = [row["key"] for row in describe_settings()]
    assert len(keys) > 60 and all(f"{key}  (" in text for key in keys)
    assert "train.best_metric  (str, default val/mean/NDCG@10; one of: val/mean/NDCG@10" in text
    assert "train.lr  (float, default 0.0001; > 0 (and finite))" in text
    assert gensr(["config", "show", "--set", "train.lr=-1"]) == 2
    assert "train.lr=-1.0 is out of range" in capsys.readouterr().err


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        gensr(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"gensr {version('gensr_ray')}"

