"""Weights in and out: diffusers folders, LDM single files, pipeline folders, bad files, atomic exports."""

import json
import pickle

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from kl_autoencoder import KLAutoencoder
from kl_autoencoder.durable import atomic_write_text
from kl_autoencoder.formats import WeightsError, diffusers_to_ldm, ldm_to_diffusers
from kl_autoencoder.model import infer_config
from tests.conftest import tiny_config

load_model = KLAutoencoder.from_pretrained

X = torch.rand(2, 3, 32, 32) * 2 - 1


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        if isinstance(model, AutoencoderKL):
            dist = model.encode(X).latent_dist
            return dist.mean, model.decode(dist.mean).sample
        posterior = model.encode(X)
        return posterior.mean, model.decode(posterior.mean)


def assert_same_outputs(a, b) -> None:
    for x, y in zip(outputs(a), outputs(b)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_diffusers_export_loads_in_diffusers(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    ref = AutoencoderKL.from_pretrained(folder).eval()
    assert tuple(ref.config.block_out_channels) == tiny_model.config.block_out_channels
    assert_same_outputs(tiny_model, ref)
    # and back: diffusers' own save_pretrained folder loads into ours
    ref.save_pretrained(tmp_path / "from_diffusers")
    assert_same_outputs(KLAutoencoder.from_pretrained(tmp_path / "from_diffusers"), ref)


def test_pipeline_folder_uses_vae_subfolder(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert_same_outputs(KLAutoencoder.from_pretrained(tmp_path / "pipeline"), tiny_model)


def test_ldm_export_round_trip_and_key_names(tiny_model, tmp_path):
    path = tiny_model.save_pretrained(tmp_path / "vae.safetensors", format="ldm")
    from safetensors.torch import load_file

    keys = set(load_file(path))
    assert "encoder.down.0.block.0.norm1.weight" in keys
    assert "decoder.up.1.block.0.conv1.weight" in keys  # LDM numbers decoder levels from the bottom
    assert load_file(path)["encoder.mid.attn_1.q.weight"].dim() == 4  # attention as 1x1 convs
    loaded = KLAutoencoder.from_pretrained(path)  # config read from the file's header
    assert loaded.config == tiny_model.config
    assert_same_outputs(loaded, tiny_model)


def test_ldm_export_loads_with_diffusers_single_file(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "vae")
    path = tiny_model.save_pretrained(tmp_path / "vae.safetensors", format="ldm")
    ref = AutoencoderKL.from_single_file(str(path), config=str(folder)).eval()
    assert_same_outputs(ref, tiny_model)


def test_full_sd_checkpoint_with_prefix_and_pickle(tiny_model, tmp_path):
    ldm = diffusers_to_ldm(tiny_model.state_dict())
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # the UNet's keys must be ignored
    torch.save({"state_dict": full}, tmp_path / "sd.ckpt")
    loaded = KLAutoencoder.from_pretrained(tmp_path / "sd.ckpt", config=tiny_model.config)
    assert_same_outputs(loaded, tiny_model)


def test_ldm_training_checkpoint_drops_loss_weights(tiny_model, tmp_path):
    ldm = diffusers_to_ldm(tiny_model.state_dict())
    ldm["loss.discriminator.main.0.weight"] = torch.zeros(2, 2)
    save_file(ldm, tmp_path / "ae.safetensors")
    assert_same_outputs(KLAutoencoder.from_pretrained(tmp_path / "ae.safetensors", config=tiny_model.config), tiny_model)


def test_key_maps_are_inverse(tiny_model):
    state = tiny_model.state_dict()
    back = ldm_to_diffusers(diffusers_to_ldm(state))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_infer_config_from_weights():
    model = KLAutoencoder(block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=16,
                          mid_block_add_attention=False)
    config = infer_config(model.state_dict())
    for field in ("block_out_channels", "layers_per_block", "latent_channels", "mid_block_add_attention"):
        assert getattr(config, field) == getattr(model.config, field)


def test_export_dtype(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "vae", dtype=torch.float16)
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(folder / "diffusion_pytorch_model.safetensors").values())
    loaded = KLAutoencoder.from_pretrained(folder, dtype=torch.float16)
    assert loaded.decoder.conv_out.weight.dtype == torch.float16


def test_export_replaces_existing_folder_atomically(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "vae")
    other = KLAutoencoder(tiny_config(latent_channels=8))
    other.save_pretrained(folder)
    assert KLAutoencoder.from_pretrained(folder).config.latent_channels == 8
    assert [p.name for p in tmp_path.iterdir()] == ["vae"]  # no temporary leftovers


def test_atomic_write_text_leaves_no_partial_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "one")

    class Boom(Exception):
        pass

    from kl_autoencoder.durable import atomic_write

    def failing(tmp):
        tmp.write_text("half")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(target, failing)
    assert target.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ---- bad input: each names the problem, none loads partially ----------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_folder_without_config(tmp_path):
    with pytest.raises(WeightsError, match="without config.json"):
        load_model(tmp_path)


def test_wrong_shapes_named(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())
    config["latent_channels"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"shape mismatch .*decoder.conv_in.weight"):
        load_model(folder)


def test_missing_keys_named(tiny_model, tmp_path):
    state = dict(tiny_model.state_dict())
    del state["decoder.conv_out.bias"]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(WeightsError, match=r"missing 1: decoder.conv_out.bias"):
        load_model(tmp_path / "partial.safetensors", config=tiny_model.config)


def test_pickle_disguised_as_safetensors(tiny_model, tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(WeightsError, match="not a valid safetensors file.*pickle"):
        load_model(path)


class Evil:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_model(path)


def test_config_of_other_class(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "UNet2DModel"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="UNet2DModel"):
        load_model(folder)


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="could not download 'someone/some-vae'"):
        load_model("someone/some-vae")


# ---- one rule each: local path or hub id, config.json here or in vae/; no model <-> formats import cycle -------------


@pytest.mark.parametrize("text, local", [
    ("stabilityai/sd-vae-ft-mse", False),
    ("black-forest-labs/FLUX.1-dev", False),  # a dot in a hub name is not a file suffix
    ("mnist", False),                         # hub datasets may be a bare name
    ("./vae", True), ("../vae", True), ("/abs/vae", True), ("~/vae", True), ("runs/q/vae", True),
    ("C:\\models\\vae", True), (".hidden", True), ("vae.safetensors/", True),
])
def test_local_path_or_hub_id(text, local):
    from kl_autoencoder.formats import is_hub_id, is_local_path

    assert is_local_path(text) is local
    assert is_hub_id(text) is not local


def test_existing_path_is_local_even_when_spelled_like_a_hub_id(tmp_path, monkeypatch):
    from kl_autoencoder.formats import is_local_path

    monkeypatch.chdir(tmp_path)
    assert not is_local_path("owner/vae")
    (tmp_path / "owner" / "vae").mkdir(parents=True)
    assert is_local_path("owner/vae")


def test_dotted_hub_id_is_downloaded_not_refused(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="could not download 'black-forest-labs/FLUX.1-dev'"):
        load_model("black-forest-labs/FLUX.1-dev")
    with pytest.raises(WeightsError, match="model path not found: missing.safetensors"):
        load_model("missing.safetensors")  # a weights file name is never a hub id


def test_find_config_json_here_or_in_vae(tiny_model, tmp_path):
    from kl_autoencoder.formats import find_config_json

    assert find_config_json(tmp_path) is None
    tiny_model.save_pretrained(tmp_path / "pipeline" / "vae")
    assert find_config_json(tmp_path / "pipeline") == tmp_path / "pipeline" / "vae" / "config.json"
    assert find_config_json(tmp_path / "pipeline" / "vae") == tmp_path / "pipeline" / "vae" / "config.json"


def _imports(path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import statement in a source file."""
    import ast

    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(name, id(node) in top) for name in names]
    return found


def test_no_import_cycle_between_model_and_formats():
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "kl_autoencoder"
    family = ("kl_autoencoder.model", "kl_autoencoder.pretrained", "kl_autoencoder.autoencoder_config",
              "kl_autoencoder.vae_blocks")
    assert not [name for name, _ in _imports(package / "formats.py") if name.startswith(family)]
    loading_imports = _imports(package / "pretrained.py")  # the model's loading and export
    assert ("kl_autoencoder.formats", True) in loading_imports  # it builds on formats, at the top
    for module in ("model.py", "pretrained.py"):
        imports = _imports(package / module)
        assert all(top for name, top in imports if name.startswith("kl_autoencoder")), imports
