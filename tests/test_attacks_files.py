"""Attacks through files and folders: each test performs the attack with the installed code paths.

Exports never delete a folder the toolkit did not write (`convert`, `save_pretrained`, durable.atomic_write_dir);
pretrained backbones planted in torch hub's cache are never unpickled with code execution (LPIPS in evaluation,
training and distillation; rFID's Inception); hostile tiny-autoencoder configs fail before allocating; compressed
pickle checkpoints are refused before unpickling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kl_autoencoder import KLAutoencoder
from kl_autoencoder.cli import main
from kl_autoencoder.formats import WeightsError
from tests.conftest import TINY_TRAINING, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` (hidden ones too) -> its text, or 'dir'."""
    return {p.relative_to(folder).as_posix(): ("dir" if p.is_dir() else p.read_bytes().hex()[:64])
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def export(tmp_path, tiny_model):
    return tiny_model.save_pretrained(tmp_path / "src")


@pytest.fixture
def documents(tmp_path):
    folder = tmp_path / "documents"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("precious")
    (folder / "sub" / "photo.png").write_bytes(b"\x89PNG precious")
    return folder


# --------------------------------------------------------------------------------------------------------------------
# 1. Exports never delete what the toolkit did not write


def test_convert_refuses_to_replace_a_folder_that_is_not_an_export(export, documents, tmp_path, capsys):
    before = _tree(tmp_path)
    assert main(["convert", str(export), str(documents)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(documents) in line and "--overwrite" in line
    assert _tree(tmp_path) == before  # the documents, and no hidden temporary folder beside them


def test_convert_replaces_a_foreign_folder_only_with_overwrite(export, documents, capsys):
    assert main(["convert", str(export), str(documents), "--overwrite"]) == 0
    assert sorted(p.name for p in documents.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not [p for p in documents.parent.iterdir() if p.name.startswith(".")]


def test_a_previous_export_is_replaced_without_the_flag(export, tmp_path, capsys):
    dst = tmp_path / "dst"
    KLAutoencoder(tiny_config(latent_channels=8)).save_pretrained(dst)
    assert main(["convert", str(export), str(dst)]) == 0
    assert KLAutoencoder.from_pretrained(dst).config.latent_channels == 4


@pytest.mark.parametrize("where", ["home", "cwd", "cwd-absolute", "parent-of-source", "source-itself"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_never_replaces_home_cwd_or_a_folder_holding_the_source(where, overwrite, tiny_model, tmp_path,
                                                                         monkeypatch, capsys):
    home, work = tmp_path / "home", tmp_path / "work"
    for folder in (home, work):
        folder.mkdir()
        (folder / "notes.txt").write_text("precious")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    project = tmp_path / "project"
    src = tiny_model.save_pretrained(project / "vae")
    (project / "notes.txt").write_text("precious")
    dst = {"home": str(home), "cwd": ".", "cwd-absolute": str(work), "parent-of-source": str(project),
           "source-itself": str(src)}[where]
    before = _tree(tmp_path)
    assert main(["convert", str(src), dst] + (["--overwrite"] if overwrite else [])) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "refusing" in line
    assert _tree(tmp_path) == before  # nothing deleted, and no hidden temporary folder (`convert SRC .` left one)


def test_convert_refuses_a_plain_file_at_the_destination_even_with_overwrite(export, tmp_path, capsys):
    victim = tmp_path / "report.txt"
    victim.write_text("precious")
    for flags in ([], ["--overwrite"]):
        assert main(["convert", str(export), str(victim), *flags]) == 2
        assert "is a file" in _one_error_line(capsys.readouterr().err)
    assert victim.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["report.txt", "src"]


def test_root_home_and_cwd_are_protected_even_with_overwrite(tmp_path, monkeypatch):
    from kl_autoencoder.durable import OutputRefused, check_replaceable_dir

    monkeypatch.chdir(tmp_path)
    for path in ("/", str(Path.home()), str(Path.home().parent), ".", "..", str(tmp_path)):
        with pytest.raises(OutputRefused, match="refusing"):
            check_replaceable_dir(path, overwrite=True)


def test_ldm_export_refuses_to_replace_a_file_that_is_not_safetensors(export, tmp_path, capsys):
    victim = tmp_path / "notes.safetensors"
    victim.write_text("my notes, misnamed")
    assert main(["convert", str(export), str(victim), "--format", "ldm"]) == 2
    assert "--overwrite" in _one_error_line(capsys.readouterr().err)
    assert victim.read_text() == "my notes, misnamed"
    assert main(["convert", str(export), str(victim), "--format", "ldm", "--overwrite"]) == 0
    assert KLAutoencoder.from_pretrained(victim).config.latent_channels == 4


def test_python_save_pretrained_refuses_a_foreign_folder_unless_told(tiny_model, documents):
    from kl_autoencoder.durable import OutputRefused
    from kl_autoencoder.tiny import TinyAutoencoder, TinyConfig

    tiny = TinyAutoencoder(TinyConfig(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                      num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)))
    for model in (tiny_model, tiny):
        with pytest.raises(OutputRefused, match="overwrite=True"):
            model.save_pretrained(documents)
        assert (documents / "thesis.txt").read_text() == "precious"
    tiny.save_pretrained(documents, overwrite=True)
    tiny.save_single_files(documents, name="tiny")  # what distill leaves: still a previous export
    tiny_model.save_pretrained(documents)
    assert not (documents / "thesis.txt").exists()


def test_a_failed_export_leaves_nothing_behind_not_even_the_parents_it_made(tmp_path):
    from kl_autoencoder.durable import atomic_write_dir

    def write(folder):
        (folder / "config.json").write_text("{}")

    def check(folder):
        raise OSError("check failed (test)")

    with pytest.raises(OSError, match="check failed"):
        atomic_write_dir(tmp_path / "a" / "b" / "vae", write, check_fn=check)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------------
# 2. Backbones planted in torch hub's cache are read with weights_only=True, never executed


class _RunsCode:
    """Unpickling this creates the marker file: what a planted checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture
def planted_hub(tmp_path, monkeypatch):
    """`plant(filename)`: a code-running pickle at $TORCH_HOME/hub/checkpoints/filename; returns the marker."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.get_dir() follows TORCH_HOME again

    def plant(filename: str) -> Path:
        marker = tmp_path / f"executed-{filename}"
        path = tmp_path / "torch" / "hub" / "checkpoints" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"features.0.weight": _RunsCode(marker)}, path)
        return marker

    return plant


def _attempt(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the old code failed in various ways after running the pickle
        return error
    return None


def test_evaluation_lpips_does_not_run_a_planted_backbone(planted_hub):
    from kl_autoencoder import metrics as M

    filename = "alexnet-owt-7be5be79.pth"  # vgg goes through the same function (backbones.load_lpips_backbone)
    marker = planted_hub(filename)
    error = _attempt(lambda: M.LPIPSMetric("alex"))
    assert not marker.exists(), "the planted pickle ran"
    assert isinstance(error, ValueError) and filename in str(error) and "weights_only" in str(error)


def test_evaluate_command_stops_with_one_line_on_a_planted_backbone(export, planted_hub, tmp_path, capsys):
    marker = planted_hub("alexnet-owt-7be5be79.pth")
    code = main(["evaluate", "--model", str(export), "--data", "sample", "--num-images", "2", "--resolution", "32",
                 "--out", str(tmp_path / "eval"), "--device", "cpu", "--no-progress"])
    assert not marker.exists()
    assert code == 2 and "alexnet-owt-7be5be79.pth" in _one_error_line(capsys.readouterr().err)


def test_rfid_does_not_run_a_planted_inception(planted_hub):
    pytest.importorskip("torch_fidelity")
    from kl_autoencoder import metrics as M

    marker = planted_hub(M.INCEPTION_FID_FILE)
    error = _attempt(lambda: M.FIDMetric())
    assert not marker.exists(), "the planted pickle ran"
    assert isinstance(error, ValueError) and M.INCEPTION_FID_FILE in str(error)


@pytest.mark.parametrize("pretrained", [True, "auto"])
def test_training_lpips_does_not_run_a_planted_backbone(pretrained, planted_hub):
    from kl_autoencoder.losses import PerceptualLoss

    marker = planted_hub("squeezenet1_1-b8a52dc0.pth")
    if pretrained is True:
        with pytest.raises(RuntimeError, match="squeezenet1_1-b8a52dc0.pth"):
            PerceptualLoss("squeeze", pretrained=True)
    else:
        with pytest.warns(RuntimeWarning, match="RANDOM squeeze BACKBONE"):
            assert not PerceptualLoss("squeeze", pretrained="auto").pretrained_loaded
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["train", "distill"])
def test_train_and_distill_commands_refuse_a_planted_backbone_before_training(entry, export, planted_hub, tmp_path,
                                                                              capsys):
    marker = planted_hub("alexnet-owt-7be5be79.pth")
    lpips = ["loss.perceptual_net=alex", "loss.perceptual_pretrained=true", "loss.perceptual_weight=1"]
    out = tmp_path / "run"
    if entry == "train":
        sys.path.insert(0, str(ROOT / "training"))
        try:
            from train import main as train_main
        finally:
            sys.path.remove(str(ROOT / "training"))
        code = train_main(TINY_TRAINING + ["data.source=sample", f"train.output_dir={out}", "train.max_steps=1",
                                           *lpips])
    else:
        code = main(["distill", "--teacher", str(export), "--data", "sample", "--out", str(out), "--steps", "1",
                     "--resolution", "32", "data.num_workers=0", "train.batch_size=2", *lpips])
    assert not marker.exists()
    assert code == 2 and "alexnet-owt-7be5be79.pth" in _one_error_line(capsys.readouterr().err)


def test_the_safe_lpips_path_matches_lpips_own_loading(tmp_path, monkeypatch):
    """A benign (randomly initialised) AlexNet file in the cache: ours (weights_only) equals lpips' own loader."""
    import lpips
    import torchvision

    from kl_autoencoder import metrics as M

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir()
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = torchvision.models.alexnet(weights=None).state_dict()
    # random features (what LPIPS uses), zero classifier (unused by LPIPS; zeros are quick to make)
    torch.save({k: torch.randn(v.shape) * 0.05 if k.startswith("features.") else torch.zeros(v.shape)
                for k, v in shapes.items()}, path)
    ours = M.LPIPSMetric("alex")
    reference = lpips.LPIPS(net="alex", verbose=False).eval()  # lpips + torchvision reading the same (benign) file
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(a, b), reference(a * 2 - 1, b * 2 - 1).flatten())


def test_the_safe_rfid_path_loads_the_cached_inception(tmp_path, monkeypatch):
    """A benign (randomly initialised) Inception file in the cache: rFID's network holds exactly its tensors."""
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from kl_autoencoder import metrics as M

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = tmp_path / "checkpoints" / M.INCEPTION_FID_FILE
    path.parent.mkdir()
    with monkeypatch.context() as patch:  # a random network: skip the download its constructor would make
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        patch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
        torch.manual_seed(0)
        torch.save(FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(), path)
    cached = torch.load(path, weights_only=True)
    loaded = M.FIDMetric().metric.inception.state_dict()
    assert loaded.keys() == cached.keys() and all(torch.equal(loaded[k], cached[k]) for k in cached)


# --------------------------------------------------------------------------------------------------------------------
# 3. Hostile tiny-autoencoder configs fail before allocating


def _tiny_folder(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", **config}))
    save_file({"x": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))  # a few dozen bytes
    return folder


# Each hostile folder: config.json fields over a 80-byte weights file, and what the error must name.
HOSTILE_TINY = {
    # 450M parameters (1.8 GB to build): within the bounds, so refused from the weights' header, on the meta device
    "large": ({"encoder_block_out_channels": [512] * 4, "decoder_block_out_channels": [512] * 4,
               "num_encoder_blocks": [8] * 4, "num_decoder_blocks": [8] * 4}, "do not fit"),
    "upsampling": ({"upsampling_scaling_factor": 1024}, "upsampling_scaling_factor"),
    "blocks": ({"num_decoder_blocks": [3, 3, 3, 4000]}, "num_decoder_blocks"),
    "parameters": ({"encoder_block_out_channels": [4096] * 8, "num_encoder_blocks": [3] * 8}, "parameters"),
}


@pytest.fixture(scope="module")
def hostile_tiny_results(tmp_path_factory):
    """load_tiny on each HOSTILE_TINY folder in one subprocess whose heap is capped at 3 GiB (the code before the
    fix tried to allocate up to 43 GB), each with its error line, seconds and peak-memory growth."""
    root = tmp_path_factory.mktemp("hostile_tiny")
    for name, (config, _) in HOSTILE_TINY.items():
        _tiny_folder(root / name, config)
    script = textwrap.dedent(f"""
        import json, resource, time
        resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))
        from kl_autoencoder.tiny import load_tiny
        for name in {list(HOSTILE_TINY)!r}:
            before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
            try:
                load_tiny({str(root)!r} + "/" + name)
                error = None
            except Exception as err:
                error = type(err).__name__ + ": " + str(err)
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            print(json.dumps({{"name": name, "error": error, "seconds": time.perf_counter() - start,
                              "grown_kib": grown}}), flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    results = {r["name"]: r for r in map(json.loads, done.stdout.splitlines())}
    return root, results, done.stderr


@pytest.mark.parametrize("name", list(HOSTILE_TINY))
def test_hostile_tiny_configs_fail_fast_with_little_memory(name, hostile_tiny_results):
    root, results, stderr = hostile_tiny_results
    assert name in results, stderr[-2000:]
    result, match = results[name], HOSTILE_TINY[name][1]
    error = result["error"] or ""
    assert error.startswith("WeightsError") and match in error and "\n" not in error, error
    if name != "large":  # bounds in the config itself: the config file is named
        assert str(root / name / "config.json") in error, error
    assert result["seconds"] < 10 and result["grown_kib"] < 200 * 1024, result


def test_tiny_parameter_count_in_closed_form_matches_the_built_model():
    from kl_autoencoder.tiny import TinyAutoencoder, TinyConfig

    for config in (TinyConfig(), TinyConfig(in_channels=5, out_channels=2, latent_channels=3,
                                            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(16,) * 3,
                                            num_encoder_blocks=(1, 2), num_decoder_blocks=(0, 2, 1))):
        assert config.num_parameters() == sum(p.numel() for p in TinyAutoencoder(config).parameters())


# --------------------------------------------------------------------------------------------------------------------
# 4. Compressed pickle checkpoints are refused before unpickling


def _deflate(source: Path, target: Path) -> Path:
    """The same torch checkpoint with every entry DEFLATE-compressed (torch writes them STORED)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as packed:
        for info in original.infolist():
            packed.writestr(info.filename, original.read(info.filename))
    return target


def test_a_deflated_checkpoint_is_refused_before_unpickling(tiny_model, tmp_path, monkeypatch, capsys):
    from kl_autoencoder.formats import diffusers_to_ldm

    state = diffusers_to_ldm(tiny_model.state_dict())
    state["padding"] = torch.zeros(4 << 20)  # 16 MiB of zeros: a few KiB once deflated
    torch.save({"state_dict": state}, tmp_path / "plain.ckpt")
    bomb = _deflate(tmp_path / "plain.ckpt", tmp_path / "bomb.ckpt")
    assert bomb.stat().st_size < 1 << 20

    def never(*args, **kwargs):
        raise AssertionError("torch.load ran")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(WeightsError, match="entries are compressed") as info:
        KLAutoencoder.from_pretrained(bomb)
    assert "torch.load ran" not in str(info.value)
    assert main(["convert", str(bomb), str(tmp_path / "out")]) == 2
    assert "entries are compressed" in _one_error_line(capsys.readouterr().err) and not (tmp_path / "out").exists()


def test_a_tiny_pickle_larger_than_its_config_allows_is_refused(tmp_path, monkeypatch):
    from kl_autoencoder.tiny import TinyAutoencoder, TinyConfig, load_tiny

    model = TinyAutoencoder(TinyConfig(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                       num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)))
    folder = model.save_pretrained(tmp_path / "tiny")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({**model.state_dict(), "padding": torch.zeros(1 << 20)}, folder / "diffusion_pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran"))
    with pytest.raises(WeightsError, match="unpacks to"):
        load_tiny(folder)


def test_plain_checkpoints_still_load(tiny_model, tmp_path):
    from kl_autoencoder.formats import diffusers_to_ldm

    torch.save({"state_dict": diffusers_to_ldm(tiny_model.state_dict())}, tmp_path / "plain.ckpt")
    loaded = KLAutoencoder.from_pretrained(tmp_path / "plain.ckpt", config=tiny_model.config.to_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny_model.state_dict().values()))
    assert os.path.getsize(tmp_path / "plain.ckpt") > 0


def test_taesd_single_files_replace_only_safetensors_files(tmp_path):
    from kl_autoencoder.durable import OutputRefused
    from kl_autoencoder.tiny import TinyAutoencoder, TinyConfig

    tiny = TinyAutoencoder(TinyConfig(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                      num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)))
    (tmp_path / "tiny_decoder.safetensors").write_text("my notes, not weights")
    with pytest.raises(OutputRefused, match="not a safetensors file"):
        tiny.save_single_files(tmp_path, name="tiny")
    assert (tmp_path / "tiny_decoder.safetensors").read_text() == "my notes, not weights"
    assert not (tmp_path / "tiny_encoder.safetensors").exists()  # both checked before either is written
    tiny.save_single_files(tmp_path, name="tiny", overwrite=True)
    tiny.save_single_files(tmp_path, name="tiny")  # our own files: replaced without the flag
