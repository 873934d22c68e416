"""Seam error of tiled encode/decode against the full pass, ours vs diffusers' enable_tiling(), on astronaut 512x512.

    python benchmarks/seams.py [SIZE] [TILE] [OVERLAP] [MODEL_PATH ...]     # no path: random-init models, attention on/off
"""
import sys, tempfile, time, torch, numpy as np
from skimage import data
from diffusers import AutoencoderKL
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.tiling import encode_tiled, decode_tiled
torch.manual_seed(0)
size = int(sys.argv[1]) if len(sys.argv) > 1 else 512
x = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
x = x[..., :size, :size]
tile, overlap = int(sys.argv[2]) if len(sys.argv) > 2 else 256, int(sys.argv[3]) if len(sys.argv) > 3 else 64
paths = sys.argv[4:] or ["random"]
for path in paths:
    for attn in (True, False):
        if path == "random":
            m = KLAutoencoder(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16,
                              mid_block_add_attention=attn).eval()
            p = tempfile.mkdtemp(prefix="seam_vae_")
            m.save_pretrained(p, overwrite=True)
        else:
            if not attn: continue
            m = KLAutoencoder.from_pretrained(path).eval(); p = path
            attn = m.config.mid_block_add_attention
        d = AutoencoderKL.from_pretrained(p).eval()
        f = m.config.downsampling_factor
        d.enable_tiling()
        d.tile_sample_min_size = tile; d.tile_latent_min_size = tile // f; d.tile_overlap_factor = overlap / tile
        with torch.no_grad():
            t0 = time.time()
            post = m.encode(x); z = post.mean; full = m.decode(z)
            ours_z = encode_tiled(m, x, tile, overlap).mean
            ours_x = decode_tiled(m, z, tile, overlap)
            dz = d.encode(x).latent_dist.mean
            dx = d.decode(z).sample
        def err(a, b): return f"max {(a-b).abs().max().item():.4f} mean {(a-b).abs().mean().item():.5f}"
        print(f"[{path} attn={attn} f={f} tile={tile} overlap={overlap} image={size}] "
              f"encode ours {err(ours_z, z)} | diffusers {err(dz, z)} || decode ours {err(ours_x, full)} | diffusers {err(dx, full)}  ({time.time()-t0:.0f}s)", flush=True)
