"""Walking the latent space: interpolation between two encoded images, and truncated prior sampling.

Encode two images to their posterior means, decode the path between them (`inference.lerp` / `inference.slerp`),
and decode prior samples z ~ N(0, I) drawn with and without truncation (`inference.sample_prior`). Lerp midpoints
of two typical Gaussian vectors have a norm well below that of a typical sample; slerp keeps it. Truncation trades
variety for typicality: the decodes of truncated samples are less diverse (smaller mean pairwise distance).

By default a small digits VAE is trained in the script. With --model PATH (an exported KLAutoencoder: diffusers
folder, LDM .safetensors or hub id) the same is done on two of the built-in sample photos with the functions the
`kl-autoencoder interpolate` / `sample` commands use (`encode_batch`, `decode_sliced`).

    python examples/interpolate.py [--quick] [--out outputs/examples/interpolate]
    python examples/interpolate.py --model PATH --image-size 256
"""

from __future__ import annotations

import torch

from digits_vae import (DigitsVAE, TrainConfig, example_parser, load_digit_splits, mean_nearest_neighbour_distance,
                        parse_example_args, plt, save_figure, show_grid, train)
from kl_autoencoder.inference import decode_sliced, encode_batch, lerp, sample_prior, slerp


def path_norms(path: torch.Tensor) -> list[float]:
    return path.flatten(1).norm(dim=1).tolist()


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """The variety of a set of samples: the average L2 distance between two of them."""
    n = len(images)
    return (torch.cdist(images, images).sum() / (n * (n - 1))).item()


def digits_demo(args) -> dict:
    data = load_digit_splits()
    torch.manual_seed(args.seed)
    model = DigitsVAE(latent_dim=args.latent_dim, hidden=args.hidden)
    train(model, data.train_x, None, TrainConfig(steps=args.steps, seed=args.seed))

    # Two held-out digits of different classes as the endpoints.
    a = 0
    b = int((data.test_y != data.test_y[a]).nonzero()[0])
    with torch.no_grad():
        means = model.encode(data.test_x[[a, b]]).mode()
        paths = {name: interpolate(means[0], means[1], args.steps_between)
                 for name, interpolate in (("lerp", lerp), ("slerp", slerp))}
        strips = {name: model.decode(path) for name, path in paths.items()}

        generator = torch.Generator().manual_seed(args.seed)
        samples, distances, diversity = {}, {}, {}
        for truncation in (None, *args.truncations):
            z = sample_prior((args.num_samples, args.latent_dim), truncation=truncation, generator=generator)
            samples[truncation] = model.decode(z)
            distances[truncation] = mean_nearest_neighbour_distance(samples[truncation], data.test_x)
            diversity[truncation] = mean_pairwise_distance(samples[truncation])

    fig, axes = plt.subplots(2 + len(samples), 1, figsize=(7, 2.2 * (2 + len(samples))))
    for ax, (name, strip) in zip(axes, strips.items()):
        show_grid(ax, strip, len(strip), f"{name} from digit {int(data.test_y[a])} to digit {int(data.test_y[b])}")
    for ax, (truncation, images) in zip(axes[2:], samples.items()):
        label = "no truncation" if truncation is None else f"truncation {truncation:g}"
        show_grid(ax, images[:24], 12, f"z ~ N(0, I), {label}: diversity {diversity[truncation]:.2f}, "
                                        f"distance to nearest held-out digit {distances[truncation]:.2f}")
    plots = [save_figure(fig, args.out, "digits_interpolation_and_truncation.png")]

    for name, path in paths.items():
        print(f"{name:>5} latent norms along the path: " + " ".join(f"{n:.2f}" for n in path_norms(path)))
    for truncation, distance in distances.items():
        label = "none" if truncation is None else f"{truncation:g}"
        print(f"truncation {label:>4}: prior samples' mean pairwise distance {diversity[truncation]:.3f}, "
              f"mean distance to nearest held-out digit {distance:.3f}")
    return {"path_norms": {k: path_norms(v) for k, v in paths.items()}, "nn_distance": distances,
            "diversity": diversity, "plots": plots, "strips": strips}


def photo_demo(args) -> dict:
    """The production model on two built-in photos, through the same inference functions as the CLI."""
    from PIL import Image, ImageOps

    from kl_autoencoder.data import image_to_tensor, sample_images
    from kl_autoencoder.model import KLAutoencoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = KLAutoencoder.from_pretrained(args.model).to(device).eval()
    size = args.image_size
    if size % model.config.downsampling_factor:
        raise ValueError(f"--image-size {size} must be a multiple of the downsampling factor "
                         f"{model.config.downsampling_factor}")
    photos = sample_images("heldout")[:2]
    pixels = torch.stack([image_to_tensor(ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC))
                          for _, image in photos])
    z = encode_batch(model, pixels.to(device), "mean")
    strips = {"lerp": decode_sliced(model, lerp(z[0], z[1], args.steps_between)),
              "slerp": decode_sliced(model, slerp(z[0], z[1], args.steps_between))}
    generator = torch.Generator().manual_seed(args.seed)
    latent_shape = z.shape[1:]
    samples = {t: decode_sliced(model, sample_prior((4, *latent_shape), truncation=t, generator=generator))
               for t in (None, *args.truncations)}

    def to_numpy(images: torch.Tensor):  # [N, 3, S, S] in [-1, 1] -> one [S, N*S, 3] strip in [0, 1]
        return ((torch.cat(list(images.clamp(-1, 1).cpu()), dim=-1) + 1) / 2).permute(1, 2, 0).numpy()

    rows = [(f"{name}: {photos[0][0]} -> {photos[1][0]}", strip) for name, strip in strips.items()]
    rows += [("prior samples, " + ("no truncation" if t is None else f"truncation {t:g}"), s)
             for t, s in samples.items()]
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 2.2 * len(rows)))
    for ax, (title, images) in zip(axes, rows):
        ax.imshow(to_numpy(images))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    plots = [save_figure(fig, args.out, "photo_interpolation_and_samples.png")]
    print(f"interpolated {photos[0][0]} -> {photos[1][0]} at {size}x{size} (latent {tuple(latent_shape)})")
    return {"photos": [name for name, _ in photos], "plots": plots, "strips": {k: v.cpu() for k, v in strips.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser("interpolate", __doc__.splitlines()[0], steps=3000)
    parser.add_argument("--model", default=None, help="an exported KLAutoencoder: use it on two sample photos")
    parser.add_argument("--image-size", type=int, default=256, help="photo size for --model")
    parser.add_argument("--steps-between", type=int, default=10, help="interpolation steps, endpoints included")
    parser.add_argument("--truncations", type=float, nargs="*", default=[1.0])
    parser.add_argument("--num-samples", type=int, default=500, help="prior samples for the distance measure")
    args = parse_example_args(parser, argv)
    results = photo_demo(args) if args.model else digits_demo(args)
    print("plots:", *results["plots"])
    return results


if __name__ == "__main__":
    main()
