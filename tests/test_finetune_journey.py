"""The fine-tune journey a new user takes: a released SDXL VAE's config-less single file, fine-tuned on a folder of
their own photos, compared with the original on held-out photos of theirs, exported both ways, encoded to latents on
two CPU processes, dropped into an SDXL pipeline. One test per stumble on the way (precision on a CPU, a stop in a
long step, the resume line, the two-process encode, what evaluate says and skips, messages a user can type), then the
whole journey at full size (`test_the_whole_journey_at_full_size`: about a minute of CPU time, two minutes of wall
time on a busy two-core machine; `python -m pytest tests/test_finetune_journey.py -k whole_journey`)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kl_autoencoder import trainer
from kl_autoencoder.config import load_config
from kl_autoencoder.trainer import TrainingInterrupted, make_accelerator, train
from tests.conftest import TINY_TRAINING

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "training" / "train.py"


def tiny_run(out: Path, *overrides: str):
    return load_config(None, TINY_TRAINING + ["train.batch_size=2", "train.log_every=1", f"train.output_dir={out}",
                                              *overrides])


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------------------------- 1. precision follows the device


@pytest.mark.parametrize("recipe", ["finetune-decoder", "kl-f8", "kl-f8-c16", "eq-finetune"])
def test_recipes_train_in_fp32_on_a_cpu(recipe):
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", ["model.pretrained=unused"])
    accelerator = make_accelerator(cfg)
    assert accelerator.device.type == "cpu" and accelerator.mixed_precision == "no"


def test_auto_precision_is_said_once_at_start(tmp_path, capsys):
    train(tiny_run(tmp_path / "run", "train.max_steps=1", "train.mixed_precision=auto"))
    lines = [line for line in capsys.readouterr().out.splitlines() if "mixed precision" in line]
    assert len(lines) == 1 and "mixed precision: no" in lines[0] and "fp32 is faster" in lines[0], lines


def test_bf16_asked_for_on_a_cpu_is_kept_with_a_word():
    from kl_autoencoder.fastpath import mixed_precision_for

    assert mixed_precision_for("bf16", cpu=True)[0] == "bf16"
    assert "slower" in mixed_precision_for("bf16", cpu=True)[1]
    assert mixed_precision_for("no", cpu=True) == ("no", "mixed precision: no")
    assert mixed_precision_for("auto", cpu=True)[0] == "no"


# ------------------------------------------------------------------------------------- 1. a stop inside a long step


def stop_inside_step(monkeypatch, step: int) -> None:
    """SIGTERM to ourselves from inside the decoder's forward pass of optimizer step `step` (0-based)."""
    real = trainer.train_step

    def train_step(t, x, at, micro=0):
        if at != step:
            return real(t, x, at, micro)
        decoder = t.raw_model.decoder
        handle = decoder.register_forward_pre_hook(lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        try:
            return real(t, x, at, micro)
        finally:
            handle.remove()

    monkeypatch.setattr(trainer, "train_step", train_step)


def test_a_stop_mid_step_drops_that_step_and_the_resume_replays_it(tmp_path, monkeypatch):
    straight = train(tiny_run(tmp_path / "straight", "train.max_steps=3"))
    stop_inside_step(monkeypatch, step=1)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny_run(tmp_path / "stopped", "train.max_steps=3"))
    # the step in flight was dropped at once (not finished): the checkpoint is step 1's, the data position too
    assert stopped.value.step == 1 and stopped.value.signal_name == "SIGTERM"
    state = json.loads((stopped.value.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["batches_seen"] == 1
    monkeypatch.undo()
    resumed = train(tiny_run(tmp_path / "stopped", "train.max_steps=3", "train.resume=latest"))
    a, b = (load_file(p / "diffusion_pytorch_model.safetensors") for p in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the dropped step replayed exactly


# ------------------------------------------------------------------------------------- 2. the printed resume line


def test_the_printed_resume_line_resumes_as_printed(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(TRAIN_PY.parent))
    try:
        import train as train_py
    finally:
        sys.path.remove(str(TRAIN_PY.parent))
    out = tmp_path / "run"
    stop_inside_step(monkeypatch, step=1)
    overrides = TINY_TRAINING + ["train.batch_size=2", f"train.output_dir={out}", "train.max_steps=2"]
    assert train_py.main(["--config", str(ROOT / "configs" / "quickstart.yaml"), *overrides]) == 143
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("resume with: "))
    command = shlex.split(line.removeprefix("resume with: "))
    assert command[0] == "python" and "train.output_dir" not in line  # the run's own config.yaml says it all
    done = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and json.loads((out / "summary.json").read_text())["steps"] == 2


# ------------------------------------------------------------------------------------- 3. two CPU processes, no flags


def photo_folder(folder: Path, count: int, size: tuple[int, int] = (48, 40)) -> Path:
    """`count` photos of the built-in set (each a different crop when more are asked for than there are photos)."""
    from kl_autoencoder.data import sample_images

    folder.mkdir(parents=True)
    photos = sample_images("all")
    for i in range(count):
        name, image = photos[i % len(photos)]
        image.crop((i, i, image.width - i, image.height - i)).resize(size).save(folder / f"{i:02d}-{name}.png")
    return folder


def launch_encode(model: Path, folder: Path, out: Path, resolution: int, *extra: str) -> subprocess.CompletedProcess:
    """The README's two-process encode on a CPU machine, as a user types it: no --device, no --shard-size."""
    from tests.test_trainer import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "kl_autoencoder.cli", "encode", "--model", str(model),
           "--input", str(folder), "--out", str(out), "--resolution", str(resolution), *extra]
    return subprocess.run(cmd, env={**env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_shard_size_shrinks_only_across_processes_and_only_when_asked_for_by_nobody():
    """(The two-process launch itself runs in the whole journey below.)"""
    from kl_autoencoder.latent_shards import shard_size_for

    assert shard_size_for(16, world=2) == 8 and shard_size_for(15, world=2) == 8 and shard_size_for(1, world=4) == 1
    assert shard_size_for(16, world=1) == 256 == shard_size_for(10_000, world=2)  # reruns keep their shard layout
    assert shard_size_for(16, world=2, asked=256) == 256  # --shard-size is the user's
    assert shard_size_for(None, world=2) == 256  # webdataset / parquet shards: one unit per input shard


# ------------------------------------------------------------------------------------- 4, 5, 7, 8. evaluate


def evaluate_cli(capsys, *args: str) -> tuple[int, str, str]:
    from kl_autoencoder.cli import main

    code = main(["evaluate", "--resolution", "32", "--batch-size", "4", "--lpips-net", "alex", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_on_a_folder_says_what_it_evaluates_skips_sections_and_is_never_quiet(tmp_path, tiny_model,
                                                                                        capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))  # LPIPS / rFID: null with a reason, fast
    tiny_model.config.scaling_factor = 0.37
    model = tiny_model.save_pretrained(tmp_path / "vae")
    folder = photo_folder(tmp_path / "mine", 16, size=(40, 40))
    out = tmp_path / "eval"
    code, stdout, stderr = evaluate_cli(capsys, "--model", str(model), "--data", str(folder), "--out", str(out),
                                        "--num-images", "6", "--skip", "diffusability,fp16", "--no-progress")
    assert code == 0, stderr
    # 4: what is evaluated, in words; a folder of yours is not called held-out
    assert f"the first 6 of 16 images of {folder} (one split, all: none known to be held out)" in stderr
    # 5: the sections asked away are not run, and a line per part still comes without the bar
    result = json.loads((out / "metrics.json").read_text())
    (entry,) = result["models"].values()
    assert entry["diffusability"] is None and entry["fp16"] is None and result["skipped_sections"] == [
        "diffusability", "fp16"]
    report = (out / "report.md").read_text()
    assert "## Diffusability" not in report and "## fp16" not in report and "left out (--skip)" in report
    for part in ("reconstructing 6 images", "drawing pictures", "writing"):
        assert part in stderr, stderr
    # 7: the model's own factor beside the measured one, each named
    assert "scaling_factor 0.37 (its config), measured 1/std of its latents" in stdout
    assert "| scaling_factor (its config.json) | 0.37 |" in report and "scaling_factor measured (1 / std)" in report
    # 8: six of a sixteen-image folder is not "6 of 6"
    assert "the first 6 of the 16 in" in report.splitlines()[2] and "(--num-images 6)" in report.splitlines()[2]
    assert "6 of 6" not in report


def test_evaluate_counts_and_held_out_words_match_what_it_does(tmp_path, tiny_model, capsys, monkeypatch):
    from kl_autoencoder.cli import build_parser
    from kl_autoencoder.data import SAMPLE_HELDOUT, SAMPLE_TRAIN

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    evaluate_parser = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    help_text = " ".join(evaluate_parser.format_help().split())  # as printed, lines joined
    assert f"{len(SAMPLE_HELDOUT)} held out" in help_text and f"{len(SAMPLE_TRAIN)} trained on" in help_text
    run = tmp_path / "my-finetune"  # a training run's export, beside the config it was trained with
    model = tiny_model.save_pretrained(run / "vae")
    (run / "config.yaml").write_text(f"data:\n  source: {tmp_path / 'my-photos'}\n")
    code, stdout, stderr = evaluate_cli(capsys, "--model", str(model), "--out", str(tmp_path / "eval"),
                                        "--skip", "diffusability,fp16", "--no-progress")
    assert code == 0, stderr
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {k: len(v) for k, v in result["splits"].items()} == {"held-out": len(SAMPLE_HELDOUT),
                                                                "training": len(SAMPLE_TRAIN)}
    assert "--data not given: evaluating on the built-in sample photos" in stderr
    assert any("was trained on" in w and "held out of the sample source's training only" in w
               for w in result["models"]["my-finetune"]["warnings"])


# ------------------------------------------------------------------------------------- 6. messages one can type


def test_the_missing_vgg_message_offers_what_can_be_typed_and_a_random_vgg_is_said_at_start(tmp_path, monkeypatch,
                                                                                             capsys):
    import re
    import urllib.error

    from kl_autoencoder.losses import PerceptualLoss, PerceptualWeightsError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    with pytest.raises(PerceptualWeightsError) as missing:
        PerceptualLoss("squeeze", pretrained=True)
    offered = re.findall(r"\b(loss\.[a-z_]+=[a-z0-9]+)", str(missing.value))
    assert {o.split("=")[0] for o in offered} == {"loss.perceptual_weight", "loss.perceptual_pretrained"}
    for override in offered:  # each can be typed as it is printed
        load_config(None, [override])
    assert "pretrained=False" not in str(missing.value)
    train(tiny_run(tmp_path / "run", "train.max_steps=1", "loss.perceptual_weight=0.1", "loss.perceptual_net=squeeze",
                   "loss.perceptual_pretrained=false"))
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "RANDOM squeeze" in line]
    assert len(said) == 1 and out.index(said[0]) < out.index("exported")


# ------------------------------------------------------------------------------------- 9. info on a config-less file


def test_a_config_less_file_is_said_in_one_clean_line_and_an_sd_shaped_one_is_sd_throughout(tmp_path, tiny_model,
                                                                                             capsys):
    from safetensors.torch import save_file

    from kl_autoencoder.cli import main
    from kl_autoencoder.formats import diffusers_to_ldm

    single = tmp_path / "weights.safetensors"  # LDM keys, no config: as released files are
    save_file(diffusers_to_ldm(tiny_model.state_dict()), single, metadata={"format": "pt"})
    assert main(["info", str(single)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and err.count("\n") == 1 and "carries no config" in err, err
    assert "UserWarning" not in err and ".py:" not in err
    from kl_autoencoder.presets import PRESETS, assume_release

    sd_shapes = {**PRESETS["sd"].shape_fields(), "norm_num_groups": 32}
    config, message = assume_release(sd_shapes, "sd.safetensors")
    assert (config["sample_size"], config["force_upcast"], config["scaling_factor"]) == (512, True, 0.18215)
    assert "sample_size 512" in message and "SD 1.x" in message


# ------------------------------------------------------------------------------------- 10. help and README


def test_help_readme_and_convert_say_what_there_is():
    from kl_autoencoder.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert all(name in parser.description for name in commands), parser.description
    assert "header" in commands["convert"].format_help() and "--no-config" in commands["convert"].format_help()
    guides = {name: (ROOT / "docs" / name).read_text() for name in ("latents.md", "inference.md", "finetuning.md")}
    assert "encode.json" in guides["latents.md"] and "StableDiffusionXLPipeline" in guides["inference.md"]
    fine_tune = next(line for line in guides["finetuning.md"].splitlines()
                     if "evaluate.py --model outputs/sdxl-ft/vae" in line)
    assert "--data " in fine_tune


def test_convert_no_config_writes_weights_only_like_a_released_file(tmp_path, tiny_model):
    from safetensors import safe_open

    from kl_autoencoder import KLAutoencoder
    from kl_autoencoder.cli import main

    single = tmp_path / "released-like.safetensors"
    assert main(["convert", str(tiny_model.save_pretrained(tmp_path / "vae")), str(single), "--no-config"]) == 0
    with safe_open(str(single), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.warns(UserWarning, match="carries no config"):
        back = KLAutoencoder.from_pretrained(single)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in tiny_model.state_dict().items())
    assert main(["convert", str(tmp_path / "vae"), str(tmp_path / "folder"), "--no-config"]) == 2


# ------------------------------------------------------------------------------------- the whole journey


def sdxl_pipeline_from_tiny_parts():
    """StableDiffusionXLPipeline with a tiny UNet and tiny CLIP text encoders (random weights, from configs), no
    VAE yet and no tokenizers (prompt embeddings are given)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), norm_num_groups=1,
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=32 + 32).eval()
    text = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, pad_token_id=1, vocab_size=100, projection_dim=32)
    return StableDiffusionXLPipeline(
        vae=None, text_encoder=CLIPTextModel(text).eval(), text_encoder_2=CLIPTextModelWithProjection(text).eval(),
        tokenizer=None, tokenizer_2=None, unet=unet, add_watermarker=False,
        scheduler=DDIMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1))


def prompt_embeddings(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning from both text encoders (penultimate hidden states side by side, the pooled projection)."""
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = pipe.text_encoder_2(ids, output_hidden_states=True)
    return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds


def released_sdxl_single_file(path: Path) -> Path:
    """What people download as sdxl_vae.safetensors: SDXL's full-size architecture in LDM names, weights only
    (random here: nothing is downloaded)."""
    from kl_autoencoder.formats import save_weights
    from kl_autoencoder.model import AutoencoderConfig, KLAutoencoder
    from kl_autoencoder.presets import PRESETS

    torch.manual_seed(0)
    model = KLAutoencoder(AutoencoderConfig.from_dict(PRESETS["sdxl"].architecture()))
    return save_weights(model.state_dict(), None, path, format="ldm")


@pytest.mark.full_size
def test_the_whole_journey_at_full_size(tmp_path, monkeypatch, capsys):
    """README's fine-tune journey, step by step, with no workaround."""
    from diffusers import AutoencoderKL

    from kl_autoencoder import KLAutoencoder
    from kl_autoencoder.cli import main as cli

    sys.path.insert(0, str(TRAIN_PY.parent))
    try:
        import train as train_py
    finally:
        sys.path.remove(str(TRAIN_PY.parent))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))  # offline: no VGG, LPIPS reported as null
    monkeypatch.setattr(trainer, "save_checkpoint", lambda t, run, state: run.checkpoints / "not-written")  # 1 GB
    original = released_sdxl_single_file(tmp_path / "sdxl_vae.safetensors")
    mine = photo_folder(tmp_path / "my-photos", 12, size=(72, 72))
    held_out = photo_folder(tmp_path / "my-held-out-photos", 16, size=(72, 72))
    for extra in sorted(held_out.iterdir())[:12]:
        extra.unlink()  # four photos kept back from the fine-tune

    # info on the downloaded file: one clean warning, SD 1.x throughout until a preset says SDXL
    assert cli(["info", str(original)]) == 0
    seen = capsys.readouterr()
    assert seen.err.count("\n") == 1 and seen.err.startswith("warning: ") and "sample_size: 512" in seen.out
    assert cli(["info", str(original), "--preset", "sdxl"]) == 0
    assert "scaling_factor: 0.13025" in capsys.readouterr().out

    # fine-tune the decoder on my photos, as the README's line, at 64 px for two steps
    run = tmp_path / "sdxl-ft"
    assert train_py.main(["--config", str(ROOT / "configs" / "finetune-decoder.yaml"), f"model.pretrained={original}",
                          "model.preset=sdxl", f"data.source={mine}", f"train.output_dir={run}", "data.resolution=64",
                          "train.batch_size=1", "train.max_steps=2", "loss.perceptual_weight=0", "data.num_workers=0",
                          "train.image_every=0"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "mixed precision" in line] == [
        "training on 1 process(es), cpu; mixed precision: no (train.mixed_precision=auto: on a CPU fp32 is faster)"]
    config = json.loads((run / "vae" / "config.json").read_text())
    assert (config["scaling_factor"], config["sample_size"], config["force_upcast"]) == (0.13025, 1024, True)

    # compare with the original on my held-out photos, the long sections left out
    code = cli(["evaluate", "--model", str(run / "vae"), str(original), "--preset", "sdxl", "--data", str(held_out),
                "--out", str(tmp_path / "eval"), "--resolution", "64", "--skip", "diffusability,fp16",
                "--no-progress"])
    seen = capsys.readouterr()
    assert code == 0, seen.err
    assert f"4 images of {held_out}" in seen.err
    summary = [line for line in seen.out.splitlines() if "PSNR" in line]
    assert len(summary) == 2 and all("all images (4)" in line and "scaling_factor 0.13025 (its config)" in line
                                     for line in summary), summary

    # export both forms: the run's diffusers folder, and a single file with the same latent fields
    single = tmp_path / "sdxl-ft.safetensors"
    assert cli(["convert", str(run / "vae"), str(single)]) == 0
    assert KLAutoencoder.from_pretrained(single).config.to_dict() == KLAutoencoder.from_pretrained(
        run / "vae").config.to_dict()
    capsys.readouterr()

    # encode my photos on two CPU processes, each its share
    done = launch_encode(run / "vae", mine, tmp_path / "latents", 64)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert all(f"[process {rank}/2] 6 image(s) encoded" in done.stdout for rank in (0, 1)), done.stdout
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["count"] == 12 and manifest["model"]["scaling_factor"] == 0.13025

    # into an SDXL pipeline: pipe.vae = the fine-tune; the pipeline divides by its scaling_factor
    pipe = sdxl_pipeline_from_tiny_parts()
    pipe.vae = AutoencoderKL.from_pretrained(run / "vae").eval()
    embeds, pooled = prompt_embeddings(pipe)
    reached = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (reached.append(z.clone()), decode(z, *a, **k))[1]

    def generate(output_type: str):
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64, num_inference_steps=2,
                    guidance_scale=1.0, output_type=output_type, generator=torch.Generator().manual_seed(2)).images

    latents, image = generate("latent"), generate("np")
    assert latents.shape == (1, 4, 8, 8) and image.shape == (1, 64, 64, 3)
    torch.testing.assert_close(reached[-1], latents / 0.13025)
    ours = KLAutoencoder.from_pretrained(run / "vae").eval()
    with torch.no_grad():
        expected = (ours.decode(ours.from_diffusion_latents(latents)) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(torch.from_numpy(image[0]), expected[0].permute(1, 2, 0), atol=1e-4, rtol=1e-4)
