"""`kl-autoencoder info`: a model's config, parameter counts and latent shape (as text or JSON)."""

from __future__ import annotations

import json

from kl_autoencoder.commands.common import MODEL_HELP, add_preset, load_model


def model_info(model, image_size: int) -> dict:
    from kl_autoencoder.loading import class_name

    config = model.config
    side = -(-image_size // config.downsampling_factor)  # padded up to the latent grid, as encode does
    return {
        "class": class_name(model),
        "config": config.to_dict(),
        "parameters": {"encoder": model.num_parameters("encoder") + _count(model.quant_conv),
                       "decoder": model.num_parameters("decoder") + _count(model.post_quant_conv),
                       "total": model.num_parameters()},
        "downsampling_factor": config.downsampling_factor,
        "image_size": image_size,
        "latent_shape": [config.latent_channels, side, side],
    }


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def cmd_info(args) -> int:
    info = model_info(load_model(args.path, "cpu", preset=args.preset), args.image_size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    print(f"model: {args.path} ({info['class']})")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    print(f"parameters: encoder {p['encoder']:,}  decoder {p['decoder']:,}  total {p['total']:,}")
    print(f"downsampling factor: {info['downsampling_factor']}")
    c, h, w = info["latent_shape"]
    print(f"latent shape for {args.image_size}x{args.image_size}: [{c}, {h}, {w}]")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="config, parameter counts, latent shape")
    p.add_argument("path", help=MODEL_HELP)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_preset(p)
    p.set_defaults(func=cmd_info)
