"""Config loading: YAML + dotted overrides -> typed dataclasses, and every bad value caught with its key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kl_autoencoder.config import (ConfigError, TrainConfig, apply_override, config_from_dict, config_to_dict,
                                   load_config)

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.architecture.block_out_channels=[8, 16]", "model.architecture.norm_num_groups=4",
        "data.resolution=32"]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: dict | None = None, overrides: list[str] = ()) -> str:
    path = write(tmp_path, data or {})
    with pytest.raises(ConfigError) as info:
        load_config(path, list(TINY) + list(overrides))
    return str(info.value)


def test_yaml_and_overrides_build_typed_config(tmp_path):
    path = write(tmp_path, {"optim": {"lr": "1e-4", "betas": [0.9, 0.99]}, "train": {"max_steps": 100}})
    cfg = load_config(path, TINY + ["train.max_steps=20", "loss.gan.enabled=true", "train.resume=latest",
                                    "model.architecture.latent_channels=16"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.train.max_steps == 20
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-4 as str
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.loss.gan.enabled is True
    assert cfg.train.resume == "latest"
    assert cfg.model.architecture["block_out_channels"] == (8, 16)
    assert cfg.model.architecture["latent_channels"] == 16
    assert cfg.model.channels_last is None  # the device's measured layout unless set
    assert load_config(path, TINY + ["model.channels_last=true"]).model.channels_last is True
    # round trip through the saved form
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "train.max_steps")
    with pytest.raises(ConfigError, match="'train.max_steps' is a value"):
        apply_override({"train": {"max_steps": 3}}, "train.max_steps.x=1")


@pytest.mark.parametrize("data, overrides, key, extra", [
    ({"optim": {"lrr": 1e-4}}, [], "optim.lrr", "did you mean 'lr'"),
    ({"trian": {}}, [], "trian", "did you mean 'train'"),
    ({}, ["model.architecture.latent_chanels=8"], "model.architecture.latent_chanels", "did you mean 'latent_channels'"),
    ({}, ["train.batch_size=four"], "train.batch_size", "must be int"),
    ({}, ["train.batch_size=2.5"], "train.batch_size", "must be int"),
    ({}, ["loss.gan.enabled=3"], "loss.gan.enabled", "must be bool"),
    ({}, ["optim.betas=[0.9]"], "optim.betas", "tuple"),
    ({"train": [1, 2]}, [], "train", "must be a section"),
    ({}, ["optim.lr=-1e-4"], "optim.lr", "must be > 0"),
    ({}, ["optim.lr=0"], "optim.lr", "must be > 0"),
    ({}, ["train.batch_size=0"], "train.batch_size", ">= 1"),
    ({}, ["data.resolution=33"], "data.resolution", "divisible by the downsampling factor 2"),
    ({}, ["model.architecture.block_out_channels=[8, 16, 16, 16]", "data.resolution=36"], "data.resolution", "downsampling factor 8"),
    ({}, ["model.architecture.norm_num_groups=3"], "model.architecture.norm_num_groups", "must divide"),
    ({}, ["data.source=./no/such/folder"], "data.source", "does not exist"),
    ({}, ["train.mixed_precision=fp8"], "train.mixed_precision", "'bf16'"),
    ({}, ["loss.pixel=l3"], "loss.pixel", "'l1'"),
    ({}, ["loss.kl_schedule=cyclical"], "loss.kl_cycle_steps", "cycle"),
    ({}, ["model.freeze_encoder=true"], "model.pretrained", "model.pretrained=PATH"),
    ({}, ["model.pretrained=/no/such/vae"], "model.pretrained", "no such file"),
    ({}, ["train.ema.decay=1.5"], "train.ema.decay", "(0, 1)"),
    ({}, ["train.resume=/no/such/ckpt"], "train.resume", "checkpoint folder"),
    ({}, ["model.architecture.act_fn=tanhh"], "model.architecture", "act_fn"),
    ({}, ["model.channels_last=fast"], "model.channels_last", "bool"),
    # near names from other recipes, not only typos
    ({}, ["optim.learning_rate=1e-3"], "optim.learning_rate", "did you mean 'lr'"),
    ({}, ["train.gradient_accumulation_steps=2"], "train.gradient_accumulation_steps", "did you mean 'grad_accum_steps'"),
    ({}, ["train.ema_decay=0.99"], "train.ema_decay", "did you mean 'ema.decay'"),
    ({}, ["model.architecture.num_res_blocks=2"], "model.architecture.num_res_blocks", "did you mean 'layers_per_block'"),
    # every float finite: an inf learning rate trained and exported NaN weights
    ({}, ["optim.lr=.inf"], "optim.lr", "finite"),
    ({}, ["optim.lr=.nan"], "optim.lr", "finite"),
    ({}, ["loss.kl_weight=.inf"], "loss.kl_weight", "finite"),
    ({}, ["loss.perceptual_weight=.nan"], "loss.perceptual_weight", "finite"),
    ({}, ["loss.gan.disc_weight=.inf"], "loss.gan.disc_weight", "finite"),
    ({}, ["loss.gan.disc_lr=.inf"], "loss.gan.disc_lr", "finite"),
    ({}, ["optim.grad_clip=.inf"], "optim.grad_clip", "finite"),
    ({}, ["optim.betas=[0.9, .nan]"], "optim.betas", "finite"),
    ({}, ["train.ema.decay=.nan"], "train.ema.decay", "finite"),
    ({}, ["train.ema.decay=1.0"], "train.ema.decay", "(0, 1)"),
    ({}, ["data.resolution=1048576"], "data.resolution", "16384"),
    # model sizes and types checked by the model's own validation, before anything is allocated
    ({}, ["model.architecture.block_out_channels=[100000]"], "model.architecture.block_out_channels", "2048"),
    ({}, ["model.architecture.block_out_channels=[]"], "model.architecture.block_out_channels", "1 to 8"),
    ({}, ["model.architecture.latent_channels=1000000000"], "model.architecture.latent_channels", "[1, 256]"),
    ({}, ["model.architecture.layers_per_block=10000000"], "model.architecture.layers_per_block", "[1, 8]"),
    ({}, ["model.architecture.layers_per_block=1e7"], "model.architecture.layers_per_block", "must be int"),
    ({}, ["model.architecture.norm_num_groups=0"], "model.architecture.norm_num_groups", "[1, 2048]"),
    ({}, ["model.architecture.sample_size=-1"], "model.architecture.sample_size", "sample_size"),
    ({}, ["model.architecture.scaling_factor=abc"], "model.architecture.scaling_factor", "float"),
    ({}, ["model.architecture.scaling_factor=.nan"], "model.architecture.scaling_factor", "finite"),
    ({}, ["model.architecture.scaling_factor=0"], "model.architecture.scaling_factor", "> 0"),
    ({}, ["model.architecture.shift_factor=.inf"], "model.architecture.shift_factor", "finite"),
    ({}, ["model.architecture.latent_channels=4", "model.architecture.latents_std=[1, 1]"],
     "model.architecture.latents_std", "latents_std has 2 entries"),
])
def test_bad_values_name_the_key(tmp_path, data, overrides, key, extra):
    message = error_of(tmp_path, data, overrides)
    assert f"'{key}'" in message, message
    assert extra in message, message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_existing_folder_source_is_accepted(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    cfg = load_config(None, TINY + [f"data.source={folder}"])
    assert cfg.data.source == str(folder)


@pytest.mark.parametrize("name", ["quickstart", "kl-f8", "kl-f8-c16", "finetune-decoder"])
def test_shipped_configs_load_and_validate(name, tmp_path):
    overrides = []
    if name == "finetune-decoder":
        vae = tmp_path / "vae"  # the config requires model.pretrained=PATH; a folder with a config.json will do
        vae.mkdir()
        (vae / "config.json").write_text('{"block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32}')
        overrides = [f"model.pretrained={vae}"]
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", overrides)
    assert cfg.train.max_steps >= 1
    if name == "finetune-decoder":
        assert cfg.model.freeze_encoder and cfg.loss.pixel == "l2"
    if name == "kl-f8-c16":
        assert cfg.model.architecture["latent_channels"] == 16
    assert cfg.model.channels_last is None  # the device's measured layout unless set
    if name == "kl-f8":
        assert cfg.model.architecture["block_out_channels"] == (128, 256, 512, 512)
        assert cfg.loss.gan.enabled and cfg.loss.gan.disc_start == 50001


def test_finetune_config_without_pretrained_fails_clearly():
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(ROOT / "configs" / "finetune-decoder.yaml")


def test_mixed_precision_no_from_yaml_and_command_line(tmp_path):
    # YAML 1.1 reads a bare `no` as False; the field's choices spell it "no"
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path, TINY).train.mixed_precision == "no"
    assert load_config(None, TINY + ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, TINY + ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    # a field whose choices include the booleans keeps them as booleans
    assert load_config(None, TINY + ["loss.perceptual_pretrained=false"]).loss.perceptual_pretrained is False
    with pytest.raises(ConfigError, match="'train.mixed_precision'"):
        load_config(None, TINY + ["train.mixed_precision=yes"])  # no "yes" among the choices


BILLION_LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi"))


def test_yaml_alias_bomb_fails_fast_and_clearly(tmp_path):
    assert len(BILLION_LAUGHS) < 500  # 9 ** 9 = 387 million strings once expanded
    path = tmp_path / "bomb.yaml"
    path.write_text(BILLION_LAUGHS + "train:\n  batch_size: *i\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml.*line 2: YAML aliases .* not supported"):
        load_config(path)
    with pytest.raises(ConfigError, match="aliases"):
        load_config(None, ["train.batch_size=[&a [1, 1], *a]"])
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="huge.yaml' is .* bytes"):
        load_config(huge)


@pytest.mark.parametrize("override", [
    "train.batch_size=[" + ", ".join(["1"] * 10_000) + "]",
    "train.output_dir=[" + ", ".join(["x" * 100] * 1000) + "]",
    "optim.lr=" + "9" * 5000 + "x",
    "train.batch_size=" + "[" * 300 + "]" * 300,
    "model.architecture.block_out_channels=[" + ", ".join(["100000"] * 10_000) + "]",
])
def test_error_messages_cap_what_they_print(override):
    with pytest.raises(ConfigError) as info:
        load_config(None, TINY + [override])
    assert len(str(info.value)) < 800, str(info.value)[:2000]


def test_finite_floats_required_also_for_configs_built_in_code():
    from kl_autoencoder.config import OptimConfig, validate

    with pytest.raises(ConfigError, match="'optim.lr' = inf"):
        validate(TrainConfig(optim=OptimConfig(lr=float("inf"))))


def test_pretrained_folder_config_errors_name_it(tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text('{"block_out_channels": [8, 16], "norm_num_groups": 4, "scaling_factor": "abc"}')
    message = error_of(tmp_path, {}, [f"model.pretrained={vae}"])
    assert "'model.architecture.scaling_factor'" in message and "finite" in message and str(vae) in message
    (vae / "config.json").write_text("{not json")
    message = error_of(tmp_path, {}, [f"model.pretrained={vae}"])
    assert "'model.pretrained'" in message and "not valid JSON" in message
    # a pipeline folder's vae/config.json is found by the same lookup the loader uses
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "vae" / "config.json").write_text('{"block_out_channels": [8, 16, 16], "norm_num_groups": 4}')
    with pytest.raises(ConfigError, match="'data.resolution' = 2: .*downsampling factor 4"):
        load_config(None, [f"model.pretrained={pipeline}", "data.resolution=2"])
