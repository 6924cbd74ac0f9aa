"""Run config: YAML + ``--set`` overrides, strict keys, validation, round trip, CLI."""

from __future__ import annotations

import pytest

from stcorpus.training.config import CONFIG_DIR, TrainConfig, apply_override, load_config
from stcorpus.training.errors import ConfigError


def test_builtin_config_and_overrides_are_typed() -> None:
    cfg = load_config(
        "tiny-cpu",
        overrides=["optim.lr=1e-4", "model.image.name=small-vit", "data.views=[patch, region]", "run.threads=2"],
    )
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert isinstance(cfg.optim.lr, float)  # read as a number by the settings' YAML (PyYAML alone: a string)
    assert cfg.model.image.name == "small-vit"
    assert cfg.data.views == ("patch", "region")
    assert cfg.run.threads == 2
    # untouched keys keep the file's values, and the file's values beat the defaults
    assert cfg.data.synthetic.n_genes == 64
    assert TrainConfig().data.synthetic.n_genes != 64


def test_set_accepts_several_values_and_repeats() -> None:
    from stcorpus.training.pretrain import build_parser

    args = build_parser().parse_args(["--set", "optim.lr=0.1", "loss.kind=siglip", "--set", "run.seed=3"])
    cfg = load_config(None, overrides=args.overrides)
    assert (cfg.optim.lr, cfg.loss.kind, cfg.run.seed) == (0.1, "siglip", 3)


def test_unknown_override_key_is_named_with_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny-cpu", overrides=["optim.lrr=1e-4"])
    message = str(info.value)
    assert "tiny-cpu.yaml + --set overrides: unknown key(s) in optim: lrr (did you mean 'lr'?)" in message
    assert "; known: lr, min_lr" in message


def test_unknown_key_in_file_is_named(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  image:\n    nam: small-cnn\noptimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}: unknown key(s) in model.image: nam (did you mean 'name'?)" in message
    # every bad key is reported, not only the first
    assert f"{path}: unknown key(s): optimizer (did you mean 'optim'?); known: run, data, model" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=abc", "optim.lr"),
        ("loss.kind=triplet", "loss.kind must be one of 'clip' or 'siglip', not 'triplet'"),
        ("optim.lr.x=1", "'optim.lr' is a value"),
        ("optim.lr", "section.key=value"),
        ("loss.pos=1", "region view"),
        ("data.views=[region]", "must include 'patch'"),
        ("optim.min_lr=1", "larger than lr"),
        ("model.image.pretrained=hub", "timm encoders and presets"),
        ("data.source=corpus", "data.corpus"),
    ],
)
def test_bad_values_are_rejected_with_the_reason(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny-cpu", overrides=[override])
    assert expected in str(info.value)


def test_unknown_config_name_lists_builtins() -> None:
    with pytest.raises(ConfigError, match="tiny-cpu"):
        load_config("no-such-config")


def test_yaml_round_trip(tmp_path) -> None:
    cfg = load_config("tiny-cpu", overrides=["loss.kind=siglip", "optim.betas=[0.8, 0.9]"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.optim.betas == (0.8, 0.9)


def test_apply_override_builds_nested_sections() -> None:
    raw: dict = {}
    apply_override(raw, "data.synthetic.n_genes=12")
    apply_override(raw, "run.out_dir=")
    assert raw == {"data": {"synthetic": {"n_genes": 12}}, "run": {"out_dir": ""}}


def test_cli_print_config_and_error_exit(capsys, caplog) -> None:
    from stcorpus.training.pretrain import main

    assert main(["--config", "tiny-cpu", "--set", "optim.lr=0.5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.5" in printed
    assert main(["--config", "tiny-cpu", "--set", "optim.nope=1"]) == 2
    assert "unknown key(s) in optim: nope" in caplog.text


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_builtin_config_validates(name: str) -> None:
    cfg = load_config(name)
    assert load_config(None, overrides=[]) != cfg  # a built-in config says something the defaults do not


def test_loader_settings_are_checked_when_the_config_is_read() -> None:
    cfg = load_config("corpus-cpu", overrides=["data.loader.genes.to_human=true", "data.loader.format=wds"])
    assert cfg.data.loader["genes"]["to_human"] is True and cfg.data.loader["format"] == "wds"
    with pytest.raises(ConfigError, match=r"data\.loader: must not set batch_size .*data\.batch_size"):
        load_config("corpus-cpu", overrides=["data.loader.batch_size=8"])
    with pytest.raises(ConfigError, match=r"data\.loader: unknown key\(s\): formatt \(did you mean 'format'\?\)"):
        load_config("corpus-cpu", overrides=["data.loader.formatt=wds"])
    with pytest.raises(ConfigError, match="on_bad_sample must be one of"):
        load_config("corpus-cpu", overrides=["data.loader.on_bad_sample=ignore"])
    with pytest.raises(ConfigError, match="does not feed the transformer gene encoder"):
        load_config("corpus-cpu", overrides=["model.gene.name=transformer", "data.loader.genes.transform=log1p"])
    with pytest.raises(ConfigError, match="held-out slides"):
        load_config("corpus-cpu", overrides=["data.val_split=train"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # pydantic's lax mode read these as false / true / true
        ("run.deterministic='no'", "run.deterministic must be true or false, not 'no'"),
        ("run.log_keys=yes", "run.log_keys must be true or false, not 'yes'"),
        ("eval.probe=1", "eval.probe must be true or false, not 1"),
        ("run.seed='3'", "run.seed must be an integer, not '3'"),
        ("optim.lr='0.1'", "optim.lr must be a number, not '0.1'"),
        ("data.loader.genes.niche=yes", "data.loader: genes.niche must be true or false, not 'yes'"),
    ],
)
def test_values_are_strict(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny-cpu" if "loader" not in override else "corpus-cpu", overrides=[override])
    assert expected in str(info.value)


def test_file_values_are_strict_and_numbers_read_as_numbers(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  deterministic: 'no'\noptim:\n  lr: 1e-4\n  min_lr: 0\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: run\.deterministic must be true or false, not 'no'$"):
        load_config(path)
    path.write_text("run:\n  deterministic: false\noptim:\n  lr: 1e-4\n  min_lr: 0\n")
    cfg = load_config(path)
    assert (cfg.run.deterministic, cfg.optim.lr, cfg.optim.min_lr) == (False, 1e-4, 0.0)
    path.write_text("run:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match="found duplicate key 'seed'"):
        load_config(path)
