"""Weights files as an attacker or a careless user hands them over, and exports that must never lose the previous one.

Loading: the config's types and bounds, then the file's header (names, shapes, dtypes) against that config, are checked
before any tensor is read or any layer is built; non-float tensors are refused, NaN/inf weights load with a warning.
Exporting: NaN/inf weights or factors are refused, the export is verified before it replaces the previous one, and
files end with the permissions a plain write gives under the umask.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kl_autoencoder import KLAutoencoder, formats
from kl_autoencoder.formats import WeightsError, diffusers_to_ldm
from tests.conftest import tiny_config


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself) -> its bytes."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(p.relative_to(path.parent)): p.read_bytes() for p in files if p.is_file()}


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if any weights are read: checks that must happen on the header alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read before the header check")

    monkeypatch.setattr(formats, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if a real (non-meta) layer is built."""
    real_init = torch.nn.Conv2d.__init__

    def init(self, *args, **kwargs):
        if kwargs.get("device") is None and torch.empty(0).device.type != "meta":
            raise AssertionError("a layer was built before the config was checked")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Conv2d, "__init__", init)


# --------------------------------------------------------------------------------------------------------------------
# Permissions: an export reads like any other file


def plain_modes(tmp_path: Path) -> tuple[int, int]:
    """The modes a plain `open(..., "w")` and `mkdir` give under the current umask: the independent reference."""
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "file").write_text("x")
    return stat.S_IMODE((reference / "file").stat().st_mode), stat.S_IMODE(reference.stat().st_mode)


@pytest.mark.parametrize("umask, expected_file, expected_dir", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_exports_get_plain_write_permissions(tiny_model, tmp_path, umask, expected_file, expected_dir):
    old = os.umask(umask)
    try:
        file_mode, dir_mode = plain_modes(tmp_path)
        assert (file_mode, dir_mode) == (expected_file, expected_dir)
        folder = tiny_model.save_pretrained(tmp_path / "vae")
        folder = tiny_model.save_pretrained(tmp_path / "vae")  # replacing an export too
        ldm = tiny_model.save_pretrained(tmp_path / "vae.safetensors", format="ldm")
        half = tiny_model.save_pretrained(tmp_path / "vae-fp16", dtype="fp16")
    finally:
        os.umask(old)
    for path in (folder / "config.json", folder / "diffusion_pytorch_model.safetensors", ldm,
                 half / "diffusion_pytorch_model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, (path, oct(path.stat().st_mode))
    for path in (folder, half):
        assert stat.S_IMODE(path.stat().st_mode) == dir_mode, (path, oct(path.stat().st_mode))


# --------------------------------------------------------------------------------------------------------------------
# Exports: refused before writing when they hold NaN/inf, verified before they replace the previous one


def poisoned(model: KLAutoencoder, value: float) -> KLAutoencoder:
    bad = KLAutoencoder(model.config)
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.decoder.conv_out.weight[0, 0, 0, 0] = value
        bad.encoder.conv_in.bias.fill_(value)
    return bad


@pytest.mark.parametrize("format, name", [("diffusers", "vae"), ("ldm", "vae.safetensors")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_are_refused_and_previous_export_kept(tiny_model, tmp_path, format, name, value):
    target = tiny_model.save_pretrained(tmp_path / name, format=format)
    before = snapshot(target)
    with pytest.raises(WeightsError, match=r"refusing to export .*9 NaN/inf values in 2 tensors.*"
                                           r"(decoder.conv_out.weight.*encoder.conv_in.bias|encoder.conv_in.bias)"):
        poisoned(tiny_model, value).save_pretrained(target, format=format)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary leftovers


def test_fp16_overflow_is_refused(tiny_model, tmp_path):
    big = poisoned(tiny_model, 1e6)  # finite in fp32, inf in fp16
    with pytest.raises(WeightsError, match="after the cast to float16"):
        big.save_pretrained(tmp_path / "vae", dtype=torch.float16)
    assert not (tmp_path / "vae").exists()


@pytest.mark.parametrize("field, value", [("scaling_factor", float("nan")), ("scaling_factor", float("inf")),
                                          ("scaling_factor", 0.0), ("shift_factor", float("nan")),
                                          ("latents_std", (1.0, float("inf"), 1.0, 1.0))])
@pytest.mark.parametrize("format, name", [("diffusers", "vae"), ("ldm", "vae.safetensors")])
def test_nonfinite_factors_are_refused_and_previous_export_kept(tiny_model, tmp_path, field, value, format, name):
    target = tiny_model.save_pretrained(tmp_path / name, format=format)
    before = snapshot(target)
    setattr(tiny_model.config, field, value)  # as the trainer sets a measured factor after construction
    with pytest.raises(WeightsError, match=f"refusing to export .*{field}"):
        tiny_model.save_pretrained(target, format=format)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_export_is_verified_before_it_replaces_the_previous_one(tiny_model, tmp_path, monkeypatch):
    target = tiny_model.save_pretrained(tmp_path / "vae")
    before = snapshot(target)
    real_read = formats.read_state_dict

    def corrupted_read_back(path, meta=False):  # the disk returned something else than was written
        state = real_read(path, meta)
        state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 1
        return state

    monkeypatch.setattr(formats, "read_state_dict", corrupted_read_back)
    other = KLAutoencoder(tiny_config(latent_channels=8))
    with pytest.raises(WeightsError, match="export check failed: .*decoder.conv_out.bias differs"):
        other.save_pretrained(target)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_ldm_export_is_verified_before_it_replaces_the_previous_one(tiny_model, tmp_path, monkeypatch):
    target = tiny_model.save_pretrained(tmp_path / "vae.safetensors", format="ldm")
    before = snapshot(target)
    real_load = formats.load_file

    def corrupted_read_back(path):
        state = real_load(path)
        state.pop("decoder.conv_out.bias")
        return state

    monkeypatch.setattr(formats, "load_file", corrupted_read_back)
    with pytest.raises(WeightsError, match="export check failed"):
        poisoned(tiny_model, 0.5).save_pretrained(target, format="ldm")
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae.safetensors"]


# --------------------------------------------------------------------------------------------------------------------
# Loading: configs and headers checked before anything is read or built


def write_folder(tmp_path: Path, model: KLAutoencoder, **config_changes) -> Path:
    folder = model.save_pretrained(tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, match", [
    ({"block_out_channels": [100000]}, "block_out_channels must list 1 to 8 channel counts"),
    ({"latent_channels": 1_000_000_000}, r"latent_channels must be an integer in \[1, 256\]"),
    ({"layers_per_block": 10_000_000}, "layers_per_block"),
    ({"layers_per_block": 1.5}, "layers_per_block"),
    ({"norm_num_groups": 0}, "norm_num_groups"),
    ({"norm_num_groups": 3}, "norm_num_groups=3 does not divide"),
    ({"sample_size": "big"}, "sample_size"),
    ({"scaling_factor": "abc"}, "scaling_factor must be a finite number"),
    ({"scaling_factor": None}, "scaling_factor"),
    ({"use_quant_conv": "yes"}, "use_quant_conv must be true or false"),
    ({"act_fn": ["silu"]}, "act_fn"),
    ({"block_out_channels": 8}, "block_out_channels"),
])
def test_bad_config_json_fails_before_reading_or_building(tiny_model, tmp_path, changes, match, request):
    folder = write_folder(tmp_path, tiny_model, **changes)
    request.getfixturevalue("no_tensor_reads")
    request.getfixturevalue("no_model_built")
    with pytest.raises(WeightsError, match=f"{folder / 'config.json'}: .*{match}"):
        KLAutoencoder.from_pretrained(folder)


def test_header_shapes_are_checked_before_any_tensor_is_read(tiny_model, tmp_path, request):
    folder = write_folder(tmp_path, tiny_model, block_out_channels=[16, 32], latent_channels=8)
    ldm = tiny_model.save_pretrained(tmp_path / "vae.safetensors", format="ldm")
    request.getfixturevalue("no_tensor_reads")
    with pytest.raises(WeightsError, match=r"shape mismatch .*file \(8, 3, 3, 3\) vs model \(16, 3, 3, 3\)"):
        KLAutoencoder.from_pretrained(folder)
    with pytest.raises(WeightsError, match="decoder.conv_in.weight: file .* vs model"):
        KLAutoencoder.from_pretrained(ldm, config=tiny_config(latent_channels=8))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.int64])
def test_non_float_weights_are_refused_naming_file_and_key(tiny_model, tmp_path, dtype, no_tensor_reads):
    state = dict(tiny_model.state_dict())
    state["decoder.conv_out.weight"] = torch.ones_like(state["decoder.conv_out.weight"]).to(dtype)
    path = tmp_path / "ae.safetensors"
    save_file(diffusers_to_ldm(state), path)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(WeightsError, match=rf"{path}: 1 tensor\(s\) are not floating point.*"
                                           rf"decoder.conv_out.weight \({name}\)"):
        KLAutoencoder.from_pretrained(path, config=tiny_model.config)


def test_non_float_weights_in_a_pickle_are_refused(tiny_model, tmp_path):
    state = dict(tiny_model.state_dict())
    state["encoder.conv_in.bias"] = torch.zeros(8, dtype=torch.uint8)
    torch.save({"state_dict": state}, tmp_path / "ae.ckpt")
    with pytest.raises(WeightsError, match=r"ae.ckpt: 1 tensor\(s\) are not floating point.*encoder.conv_in.bias"):
        KLAutoencoder.from_pretrained(tmp_path / "ae.ckpt", config=tiny_model.config)


def test_nonfinite_weights_load_with_a_warning_naming_them(tiny_model, tmp_path):
    state = dict(tiny_model.state_dict())
    state["decoder.conv_out.bias"] = torch.full_like(state["decoder.conv_out.bias"], float("nan"))  # all NaN
    weight = state["encoder.conv_in.weight"].clone()
    weight[0, 0, 0, :2] = float("inf")
    state["encoder.conv_in.weight"] = weight
    path = tmp_path / "diverged.safetensors"
    save_file(state, path)
    with pytest.warns(UserWarning, match=r"diverged.safetensors: 5 NaN/inf values in 2 of \d+ tensors: "
                                         r"decoder.conv_out.bias \(3\), encoder.conv_in.weight \(2\)"):
        model = KLAutoencoder.from_pretrained(path, config=tiny_model.config)
    assert torch.isnan(model.decoder.conv_out.bias).all()  # loaded as it is, for inspection


def test_clean_weights_load_without_warnings(tiny_model, tmp_path, recwarn):
    folder = tiny_model.save_pretrained(tmp_path / "vae")
    KLAutoencoder.from_pretrained(folder)
    assert not [w for w in recwarn if "NaN" in str(w.message)]


def test_inferred_config_is_checked_too(tmp_path, no_model_built):
    # a single file without config: the architecture read off the shapes goes through the same validation
    state = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 300, 3, 3),
             "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
             "encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3)}
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(WeightsError, match=r"inferred from the shapes in .*odd.safetensors: latent_channels must be"):
        KLAutoencoder.from_pretrained(tmp_path / "odd.safetensors")


def test_header_metadata_that_is_not_a_config_is_refused(tiny_model, tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(diffusers_to_ldm(tiny_model.state_dict()), path, metadata={"kl_autoencoder_config": "[1, 2]"})
    with pytest.raises(WeightsError, match="kl_autoencoder_config in its header is not a JSON object"):
        KLAutoencoder.from_pretrained(path)
    save_file(diffusers_to_ldm(tiny_model.state_dict()), path, metadata={"kl_autoencoder_config": "{oops"})
    with pytest.raises(WeightsError, match="not valid JSON"):
        KLAutoencoder.from_pretrained(path)


def test_loaded_weights_match_the_file(tiny_model, tmp_path):
    # the header-first path still loads exactly what is in the file
    folder = tiny_model.save_pretrained(tmp_path / "vae")
    loaded = KLAutoencoder.from_pretrained(folder)
    on_disk = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in on_disk.items())
