"""The tiny autoencoder against diffusers' AutoencoderTiny (weights, outputs, files, pipelines) and its distillation."""

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kl_autoencoder import KLAutoencoder
from kl_autoencoder.data import image_to_tensor, sample_images
from kl_autoencoder.formats import WeightsError
from kl_autoencoder.tiny import (DistillationTargets, TinyAutoencoder, TinyConfig, build_student,
                                 distillation_loss, distillation_targets)
from tests.conftest import tiny_config

ASSETS = Path(__file__).resolve().parent / "assets"
SMALL = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
             num_encoder_blocks=(1, 1, 2, 1), num_decoder_blocks=(2, 1, 1, 1))


def f8_teacher(latent_channels=4, **overrides):
    """A randomly initialised f8 KL VAE (4 levels) small enough for a test."""
    torch.manual_seed(0)
    return KLAutoencoder(tiny_config(block_out_channels=(8, 8, 16, 16), latent_channels=latent_channels,
                                     mid_block_add_attention=False, **overrides)).eval()


def small_student(teacher):
    torch.manual_seed(1)
    return build_student(teacher.config, width=8, encoder_blocks=1, decoder_blocks=1).eval()


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def diffusers_tiny(**config):
    from diffusers import AutoencoderTiny

    torch.manual_seed(2)
    return AutoencoderTiny(**config).eval()


# ---------------------------------------------------------------------------------------------------- architecture


def test_config_defaults_are_diffusers_init_defaults():
    from diffusers import AutoencoderTiny

    params = inspect.signature(AutoencoderTiny.__init__).parameters
    expected = {name: p.default for name, p in params.items() if name != "self"}
    assert TinyConfig().to_dict() == {k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}


@pytest.mark.parametrize("config", [
    {},  # TAESD itself: 1.2 M parameters per half
    dict(SMALL, latent_channels=16, act_fn="gelu", upsample_fn="bilinear"),
    dict(encoder_block_out_channels=(8,) * 3, decoder_block_out_channels=(8,) * 3, num_encoder_blocks=(1, 2, 0),
         num_decoder_blocks=(0, 2, 1), in_channels=1, out_channels=2),
], ids=["taesd", "c16-gelu-bilinear", "f4-odd"])
def test_state_dict_and_outputs_match_diffusers(config):
    reference = diffusers_tiny(**config)
    ours = TinyAutoencoder(TinyConfig(**config)).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.rand(2, ours.config.in_channels, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = reference.encode(x).latents
        torch.testing.assert_close(ours.encode(x), latents, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(latents), reference.decode(latents).sample, rtol=0, atol=1e-5)
    assert ours.downsampling_factor == 32 // latents.shape[-1]


def test_invalid_configs_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="encoder_block_out_channels"):
        TinyConfig(encoder_block_out_channels=(16, 32, 32, 32))  # diffusers builds it, but it cannot run
    with pytest.raises(ValueError, match="num_decoder_blocks"):
        TinyConfig(num_decoder_blocks=(3, 3, 1))
    with pytest.raises(ValueError, match="act_fn"):
        TinyConfig(act_fn="tanhh")
    with pytest.raises(ValueError, match="latent_channels"):
        TinyConfig(latent_channels="4")


@pytest.mark.parametrize("levels, latent_channels", [(3, 4), (4, 4), (4, 16), (5, 16)],
                         ids=["f4", "f8", "f8c16", "f16"])
def test_student_has_the_teachers_latent_grid(levels, latent_channels):
    teacher = KLAutoencoder(tiny_config(block_out_channels=(8,) * levels, latent_channels=latent_channels,
                                        mid_block_add_attention=False)).eval()
    student = build_student(teacher.config, width=8, encoder_blocks=1, decoder_blocks=1)
    assert len(student.config.num_encoder_blocks) == levels  # f = 2 ** (stages - 1), the teacher's factor
    x = images(1, 64)
    with torch.no_grad():
        z = teacher.encode(x).mode()
        assert student.encode(x).shape == z.shape
        assert student.decode(z).shape == x.shape
    assert (student.config.scaling_factor, student.config.shift_factor) == (1.0, 0.0)


def test_taesd_student_for_an_sd_sized_teacher():
    from kl_autoencoder.model import AutoencoderConfig

    student = build_student(AutoencoderConfig(block_out_channels=(128, 256, 512, 512), latent_channels=4))
    assert student.config == TinyConfig()  # exactly TAESD / diffusers' defaults for an SD-style f8 VAE


# ---------------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_diffusers_loads_our_export_and_computes_the_same(tmp_path, latent_channels):
    from diffusers import AutoencoderTiny

    student = small_student(f8_teacher(latent_channels))
    student.save_pretrained(tmp_path / "tiny")
    reference = AutoencoderTiny.from_pretrained(tmp_path / "tiny").eval()
    assert reference.config.scaling_factor == 1.0 and reference.config.shift_factor == 0.0
    assert reference.config.latent_channels == latent_channels
    assert 2 ** (len(reference.config.block_out_channels) - 1) == 8  # what pipelines read as vae_scale_factor
    x = images()
    with torch.no_grad():
        latents = student.encode(x)
        torch.testing.assert_close(reference.encode(x).latents, latents, rtol=0, atol=1e-5)
        torch.testing.assert_close(reference.decode(latents).sample, student.decode(latents), rtol=0, atol=1e-5)
    files = sorted(p.name for p in (tmp_path / "tiny").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not list(tmp_path.glob(".*")), "temporary files left beside the export"


def test_our_loader_reads_a_diffusers_folder_and_pipeline_folder(tmp_path):
    config = dict(SMALL, latent_channels=16, act_fn="silu")
    reference = diffusers_tiny(**config)
    reference.save_pretrained(tmp_path / "pipe" / "vae")
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):
        ours = TinyAutoencoder.from_pretrained(path)
        assert ours.config == TinyConfig(**config)
        x = images()
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(x), reference.encode(x).latents, rtol=0, atol=1e-5)
            latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(ours.decode(latents), reference.decode(latents).sample, rtol=0, atol=1e-5)


def test_loader_errors_name_the_problem(tmp_path):
    f8_teacher().save_pretrained(tmp_path / "kl")
    with pytest.raises(WeightsError, match="AutoencoderKL'?, not an AutoencoderTiny"):
        TinyAutoencoder.from_pretrained(tmp_path / "kl")
    small_student(f8_teacher()).save_pretrained(tmp_path / "tiny")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(dict(config, num_decoder_blocks=[1, 1, 1, 1, 1])))
    with pytest.raises(WeightsError, match="num_decoder_blocks"):
        TinyAutoencoder.from_pretrained(tmp_path / "tiny")
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(dict(config, latent_channels=16)))
    with pytest.raises(WeightsError, match="shape mismatch .*encoder.layers"):
        TinyAutoencoder.from_pretrained(tmp_path / "tiny")
    with pytest.raises(WeightsError, match="from_single_files"):
        TinyAutoencoder.from_pretrained(tmp_path / "tiny" / "diffusion_pytorch_model.safetensors")


def test_failed_export_keeps_the_previous_one(tmp_path):
    student = small_student(f8_teacher())
    path = student.save_pretrained(tmp_path / "tiny")
    before = (path / "diffusion_pytorch_model.safetensors").read_bytes()
    with torch.no_grad():
        student.decoder.layers[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(WeightsError, match="NaN"):
        student.save_pretrained(path)
    assert (path / "diffusion_pytorch_model.safetensors").read_bytes() == before


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_single_files_round_trip_in_the_taesd_layout(tmp_path, latent_channels):
    from diffusers import AutoencoderTiny

    student = small_student(f8_teacher(latent_channels))
    encoder_path, decoder_path = student.save_single_files(tmp_path, name="taemy")
    assert (encoder_path.name, decoder_path.name) == ("taemy_encoder.safetensors", "taemy_decoder.safetensors")
    from safetensors.torch import load_file

    encoder, decoder = load_file(encoder_path), load_file(decoder_path)
    # TAESD's Sequential: the encoder starts with its conv at 0; the decoder with the parameter-free Clamp at 0.
    assert "0.weight" in encoder and "1.conv.0.weight" in encoder and not any(k.startswith("0.") for k in decoder)
    assert decoder["1.weight"].shape[1] == latent_channels
    # Independent reference: diffusers' own conversion rule (scripts/convert_tiny_autoencoder_to_diffusers.py).
    converted = {f"encoder.layers.{k}": v for k, v in encoder.items()}
    converted.update({f"decoder.layers.{int(k.split('.')[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in decoder.items()})
    reference = AutoencoderTiny(**{k: v for k, v in student.config.to_dict().items()}).eval()
    reference.load_state_dict(converted, strict=True)
    loaded = TinyAutoencoder.from_single_files(encoder_path, decoder_path)  # architecture read off the keys
    assert loaded.config == student.config
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), reference.encode(x).latents, rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(student.encode(x)), student.decode(student.encode(x)), rtol=0, atol=0)
        torch.testing.assert_close(reference.decode(student.encode(x)).sample, student.decode(student.encode(x)),
                                   rtol=0, atol=1e-5)


def test_single_files_that_do_not_belong_together_are_refused(tmp_path):
    enc4, dec4 = small_student(f8_teacher(4)).save_single_files(tmp_path / "a")
    enc16, dec16 = small_student(f8_teacher(16)).save_single_files(tmp_path / "b")
    with pytest.raises(WeightsError, match="4 latent channels but the decoder takes 16"):
        TinyAutoencoder.from_single_files(enc4, dec16)
    with pytest.raises(WeightsError, match=r"decoder key '0\.(weight|bias)' is not a TAESD decoder key"):
        TinyAutoencoder.from_single_files(enc4, enc4)  # an encoder file passed as the decoder


# ---------------------------------------------------------------------------------------------------- distillation


def test_targets_are_the_teachers_diffusion_latents_and_decode():
    teacher = f8_teacher(16, scaling_factor=0.7, shift_factor=0.2)
    x = images()
    targets = distillation_targets(teacher, x, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        posterior = teacher.encode(x)
        eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
        z = posterior.mean + posterior.std * eps
        torch.testing.assert_close(targets.latents, (z - 0.2) * 0.7)
        torch.testing.assert_close(targets.decoded, teacher.decode(z).clamp(-1, 1))
    mean_targets = distillation_targets(teacher, x, sample=False)
    torch.testing.assert_close(mean_targets.latents, (posterior.mean - 0.2) * 0.7)


def test_loss_is_the_weighted_sum_of_its_terms():
    from kl_autoencoder.losses import PerceptualLoss

    teacher, x = f8_teacher(), images()
    student = small_student(teacher)
    targets = distillation_targets(teacher, x, sample=False)
    perceptual = PerceptualLoss("alex", pretrained=False)
    loss, logs = distillation_loss(student, targets, x, pixel_weight=0.5, perceptual=perceptual, perceptual_weight=0.3,
                                   latent_weight=2.0)
    with torch.no_grad():
        decoded = student.decode(targets.latents)
        pixel = (decoded - targets.decoded).abs().mean()
        latent = (student.encode(x) - targets.latents).pow(2).mean()
        lpips_value = perceptual(decoded, targets.decoded)
    torch.testing.assert_close(loss.detach(), 0.5 * pixel + 0.3 * lpips_value + 2.0 * latent)
    assert set(logs) == {"pixel", "perceptual", "latent", "loss"}
    # Decoder-only distillation: the encoder is not run, so it gets no gradient.
    student.zero_grad(set_to_none=True)
    loss, logs = distillation_loss(student, targets, x, pixel_weight=1.0, latent_weight=0.0)
    loss.backward()
    assert set(logs) == {"pixel", "loss"}
    assert all(p.grad is None for p in student.encoder.parameters())
    assert all(p.grad is not None for p in student.decoder.parameters())


def test_loss_runs_through_a_ddp_wrapper_with_the_same_gradients(tmp_path):
    import torch.distributed as dist

    teacher, x = f8_teacher(), images()
    student = small_student(teacher)
    targets = distillation_targets(teacher, x, sample=False)
    distillation_loss(student, targets, x)[0].backward()
    expected = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(student)
        loss, _ = distillation_loss(wrapped, targets, x)  # one forward through the wrapper: encode and decode
        loss.backward()
    finally:
        dist.destroy_process_group()
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_latent_storage_convention_matches_diffusers():
    reference = diffusers_tiny(**SMALL)
    ours = TinyAutoencoder(TinyConfig(**SMALL))
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4)) * 2
    torch.testing.assert_close(ours.scale_latents(latents), reference.scale_latents(latents))
    stored = ours.scale_latents(latents).mul(255).round().byte()  # TAESD's 8-bit latent image
    torch.testing.assert_close(ours.unscale_latents(stored / 255.0), reference.unscale_latents(stored / 255.0))
    inside = latents.abs() < 3
    assert (ours.unscale_latents(stored / 255.0) - latents)[inside].abs().max() <= 3 / 255 + 1e-6


def crops(split, n, size=32, seed=0):
    """n random size x size crops of the built-in photos (downscaled to 96 px, so a crop holds a whole object part)."""
    generator = torch.Generator().manual_seed(seed)
    photos = [F.interpolate(image_to_tensor(im)[None], size=(96, 96), mode="area")[0] for _, im in sample_images(split)]
    out = []
    for k in range(n):
        i, j = torch.randint(0, 96 - size + 1, (2,), generator=generator).tolist()
        out.append(photos[k % len(photos)][:, i:i + size, j:j + size])
    return torch.stack(out)


def test_a_short_distillation_approaches_the_teacher():
    teacher = KLAutoencoder.from_pretrained(ASSETS / "trained-f8")  # a real (briefly trained) f8 VAE
    student = small_student(teacher).train()
    train_x, heldout_x = crops("train", 16), crops("heldout", 8, seed=1)
    train = distillation_targets(teacher, train_x, generator=torch.Generator().manual_seed(0))
    heldout = distillation_targets(teacher, heldout_x, sample=False)

    def errors():
        with torch.no_grad():
            return (F.mse_loss(student.decode(heldout.latents), heldout.decoded).item(),
                    F.mse_loss(student.encode(heldout_x), heldout.latents).item())

    decode_before, encode_before = errors()
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(80):  # 50 left the encoder at 0.92x on the colour held-out photos (incl. flower); 80: ~0.5x
        idx = torch.randperm(len(train_x), generator=order)[:2]
        loss, _ = distillation_loss(student, DistillationTargets(train.latents[idx], train.decoded[idx]), train_x[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    decode_after, encode_after = errors()
    assert decode_after < 0.3 * decode_before, (decode_before, decode_after)
    assert encode_after < 0.9 * encode_before, (encode_before, encode_after)


# ---------------------------------------------------------------------------------------------------- in a pipeline


def _sd_pipeline(vae):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, safety_checker=None, feature_extractor=None,
        scheduler=DDIMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1),
        requires_safety_checker=False)
    embeds = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    return pipe, dict(prompt_embeds=embeds)


def _sd3_pipeline(vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    generator = torch.Generator().manual_seed(1)
    return pipe, dict(prompt_embeds=torch.randn(1, 5, 16, generator=generator),
                      pooled_prompt_embeds=torch.randn(1, 8, generator=generator))


@pytest.mark.parametrize("kind", ["sd-4ch", "sd3-16ch"])
def test_student_decodes_pipeline_latents_as_the_teacher_would(tmp_path, kind):
    """Both pipelines hand the student exactly their latents L, and the teacher (z - shift) * scaling = L's z:
    the pair (teacher.to_diffusion_latents(z), teacher.decode(z)) the student is distilled on."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    if kind == "sd-4ch":
        teacher, build, shift = f8_teacher(4, scaling_factor=0.37), _sd_pipeline, 0.0
    else:
        teacher, build, shift = f8_teacher(16, scaling_factor=1.5, shift_factor=0.06), _sd3_pipeline, 0.06
    student = small_student(teacher)
    teacher.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")

    def run(vae, output_type):
        pipe, kwargs = build(vae)
        seen = []
        decode = pipe.vae.decode
        pipe.vae.decode = lambda z, *a, **k: (seen.append(z.clone()), decode(z, *a, **k))[1]  # spy on the VAE's input
        result = pipe(**kwargs, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                      output_type=output_type, generator=torch.Generator().manual_seed(2)).images
        return result, seen

    latents, _ = run(AutoencoderTiny.from_pretrained(tmp_path / "student"), "latent")
    image, seen_by_student = run(AutoencoderTiny.from_pretrained(tmp_path / "student"), "np")
    _, seen_by_teacher = run(AutoencoderKL.from_pretrained(tmp_path / "teacher"), "np")
    assert latents.shape == (1, teacher.config.latent_channels, 4, 4)
    torch.testing.assert_close(seen_by_student[-1], latents, rtol=0, atol=0)  # the identity: scaling 1, shift 0
    torch.testing.assert_close(seen_by_teacher[-1], latents / teacher.config.scaling_factor + shift)
    torch.testing.assert_close(teacher.to_diffusion_latents(seen_by_teacher[-1]), latents)
    assert image.shape == (1, 32, 32, 3) and image.min() >= 0.0 and image.max() <= 1.0
    with torch.no_grad():
        ours = (student.decode(latents) / 2 + 0.5).clamp(0, 1)
    np.testing.assert_allclose(image[0], ours[0].permute(1, 2, 0).numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- benchmark


def test_benchmark_runs_end_to_end_on_a_tiny_teacher(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tiny", ASSETS.parents[1] / "benchmarks" / "tiny.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = tmp_path / "teacher.yaml"
    config.write_text("model:\n  architecture:\n    block_out_channels: [8, 8, 16, 16]\n    norm_num_groups: 4\n"
                      "    latent_channels: 16\n")
    result = bench.main(["--config", str(config), "--resolution", "32", "--repeats", "2", "--json",
                         str(tmp_path / "out.json")])
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"parameters", "decode 32^2", "encode 32^2", "decode 32^2 peak memory",
                         "encode 32^2 peak memory"}
    assert rows["parameters"]["teacher"] == pytest.approx(
        KLAutoencoder(tiny_config(block_out_channels=(8, 8, 16, 16), latent_channels=16)).num_parameters() / 1e6)
    assert all(len(times) == 2 for job in result["seconds"].values() for times in job.values())
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == result["rows"]
