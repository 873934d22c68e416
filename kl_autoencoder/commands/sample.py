"""`kl-autoencoder sample`: draws from the VAE prior N(0, I), decoded to PNGs."""

from __future__ import annotations

from pathlib import Path

import torch

from kl_autoencoder.commands.common import UsageError, add_replace, add_tiling, check_tiling_args, load_model, tiling


def cmd_sample(args) -> int:
    from tqdm.auto import tqdm

    from kl_autoencoder.inference import decode_sliced
    from kl_autoencoder.output_names import save_png
    from kl_autoencoder.outputs import check_output, remove_earlier, safe_parent
    from kl_autoencoder.sampling import sample_prior

    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    earlier = check_output(args.out, "sample", earlier=["sample-*.png"], overwrite=args.overwrite, noun="sample",
                           why="new samples would replace some of them and leave the others")
    model = load_model(args.model, args.device, kl_only="sample draws from a KL VAE's prior N(0, I), which a tiny "
                  "autoencoder does not have; sample with its teacher")
    check_tiling_args(args, model)
    device = next(model.parameters()).device
    shape = (args.num, *model.config.latent_shape(args.image_size, args.image_size))
    z = sample_prior(shape, args.truncation, torch.Generator().manual_seed(args.seed)).to(device)
    out = Path(args.out)
    with tqdm(total=args.num, desc="sampling", unit="img") as progress:
        for start in range(0, args.num, args.batch_size):
            images = decode_sliced(model, z[start:start + args.batch_size], None, **tiling(args))
            remove_earlier(earlier)  # --overwrite: the earlier samples go once there are new ones to write
            earlier = []
            for i, image in enumerate(images, start):
                save_png(image, safe_parent(out, out / f"sample-{i:05d}.png"))
            progress.update(len(images))
    print(f"wrote {args.num} sample{'s' if args.num != 1 else ''} to {out}")
    return 0


def add_parser(sub) -> None:
    """The sample command: decode draws from the prior."""
    p = sub.add_parser(
        "sample", help="decode draws from the prior N(0, I)",
        description="Decode latents drawn from the VAE prior N(0, I) into PNGs (sample-00000.png, ...). A KL-VAE's "
                    "prior samples look like texture, not photos: its KL weight is tiny, so the latents carry the image "
                    "and the prior is only loosely matched. For real generation, train a diffusion model on the "
                    "latents: examples/latent_diffusion.py.")
    p.add_argument("--model", required=True,
                   help="a KL VAE (AutoencoderKL: diffusers folder, pipeline folder, LDM .safetensors or hub id); "
                        "not a tiny autoencoder, which has no prior")
    p.add_argument("--num", type=int, default=8, help="how many images to draw and decode (default: 8)")
    p.add_argument("--truncation", type=float, default=None,
                   help="redraw latent entries with |z| above this (default: no truncation)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the latent draws: the same seed, model and sizes give the same images (default: 0)")
    p.add_argument("--image-size", type=int, default=256,
                   help="side of the square images in pixels; the latent is image-size / downsampling factor, "
                        "rounded up (default: 256)")
    p.add_argument("--batch-size", type=int, default=8, help="images decoded at once (default: 8)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_tiling(p)
    add_replace(p, "the samples --out already holds (all sample-*.png there are replaced)")
    p.set_defaults(func=cmd_sample)
