"""Seam error of tiled encode/decode against the full pass, ours vs diffusers' enable_tiling(), on astronaut 512x512.

    python benchmarks/seams.py [SIZE] [TILE] [OVERLAP] [MODEL_PATH ...]     # no path: random-init models, attention on/off
"""
import argparse
import tempfile
import time

import torch

import harness  # benchmarks/harness.py, first: this checkout on sys.path

from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.tiling import decode_tiled, encode_tiled


def models(path: str, attention: bool) -> tuple[KLAutoencoder, str] | None:
    """(ours, its folder) for `path`: a random-init model with or without mid-block attention for "random", else the
    export (once, as saved)."""
    if path == "random":
        model = KLAutoencoder(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16,
                              mid_block_add_attention=attention).eval()
        folder = tempfile.mkdtemp(prefix="seam_vae_")
        model.save_pretrained(folder, overwrite=True)
        return model, folder
    return (KLAutoencoder.from_pretrained(path).eval(), path) if attention else None


def error(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max {(a-b).abs().max().item():.4f} mean {(a-b).abs().mean().item():.5f}"


def seams(path: str, attention: bool, x: torch.Tensor, tile: int, overlap: int) -> str | None:
    """One line: ours and diffusers' tiled encode and decode, each against our full pass."""
    from diffusers import AutoencoderKL

    pair = models(path, attention)
    if pair is None:
        return None
    m, folder = pair
    attention = m.config.mid_block_add_attention
    d = AutoencoderKL.from_pretrained(folder).eval()
    f = m.config.downsampling_factor
    d.enable_tiling()
    d.tile_sample_min_size, d.tile_latent_min_size, d.tile_overlap_factor = tile, tile // f, overlap / tile
    with torch.no_grad():
        t0 = time.time()
        z = m.encode(x).mean
        full = m.decode(z)
        ours_z = encode_tiled(m, x, tile, overlap).mean
        ours_x = decode_tiled(m, z, tile, overlap)
        dz = d.encode(x).latent_dist.mean
        dx = d.decode(z).sample
    return (f"[{path} attn={attention} f={f} tile={tile} overlap={overlap} image={x.shape[-1]}] "
            f"encode ours {error(ours_z, z)} | diffusers {error(dz, z)} || decode ours {error(ours_x, full)} | "
            f"diffusers {error(dx, full)}  ({time.time()-t0:.0f}s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("size", type=int, nargs="?", default=512, help="image side, px (astronaut is 512)")
    p.add_argument("tile", type=int, nargs="?", default=256, help="tile side, px")
    p.add_argument("overlap", type=int, nargs="?", default=64, help="overlap, px")
    p.add_argument("paths", nargs="*", default=["random"], metavar="MODEL_PATH",
                   help="exports to measure (default: random-init models with and without attention)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from skimage import data

    args = parse_args(argv)
    torch.manual_seed(0)
    x = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    x = x[..., :args.size, :args.size]
    for path in args.paths:
        for attention in (True, False):
            line = seams(path, attention, x, args.tile, args.overlap)
            if line is not None:
                print(line, flush=True)


if __name__ == "__main__":
    main()
