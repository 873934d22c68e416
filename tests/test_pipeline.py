"""Our exported VAE inside diffusers' StableDiffusionPipeline, and the latent-diffusion example end to end."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kl_autoencoder import KLAutoencoder
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SCALING = 0.37  # distinctive: the pipeline must divide by exactly this before decoding


@pytest.fixture
def exported_vae(tmp_path):
    torch.manual_seed(0)
    model = KLAutoencoder(tiny_config(scaling_factor=SCALING)).eval()
    return model, model.save_pretrained(tmp_path / "vae")


def _pipeline(vae_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_path), text_encoder=None, tokenizer=None, unet=unet,
        scheduler=DDIMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def test_stable_diffusion_pipeline_decodes_with_our_vae_and_scaling(exported_vae):
    model, path = exported_vae
    pipe = _pipeline(path)
    assert pipe.vae.config.scaling_factor == SCALING and pipe.vae_scale_factor == model.config.downsampling_factor
    embeds = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    seen = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (seen.append(z.clone()), decode(z, *a, **k))[1]  # spy on what reaches the VAE

    def run(output_type):
        return pipe(prompt_embeds=embeds, height=16, width=16, num_inference_steps=2, guidance_scale=1.0,
                    output_type=output_type, generator=torch.Generator().manual_seed(2)).images

    latents = run("latent")
    image = run("np")
    assert latents.shape == (1, 4, 8, 8) and image.shape == (1, 16, 16, 3)
    torch.testing.assert_close(seen[-1], latents / SCALING)  # the pipeline read our scaling_factor
    with torch.no_grad():
        ours = (model.decode(model.from_diffusion_latents(latents)) / 2 + 0.5).clamp(0, 1)
    np.testing.assert_allclose(image[0], ours[0].permute(1, 2, 0).numpy(), atol=1e-5)


def test_latent_diffusion_example_runs_quickly_and_learns(exported_vae, tmp_path):
    _, path = exported_vae
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "examples/latent_diffusion.py", "--vae", str(path), "--quick", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file()
    first, last = (float(line.split("=")[1]) for line in result.stdout.splitlines() if line.startswith("loss_"))
    assert last < first, result.stdout


def test_latent_diffusion_example_explains_a_missing_vae(tmp_path):
    result = subprocess.run([sys.executable, "examples/latent_diffusion.py", "--vae", str(tmp_path / "none")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "run the README main command first" in result.stderr
