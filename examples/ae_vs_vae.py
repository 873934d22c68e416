"""Plain autoencoder vs VAE of the same size on 8x8 digits: only the VAE is a generative model.

Both reconstruct well. Decode z ~ N(0, I) and the AE gives blots (nothing made its codes look like N(0, I)), while
the VAE, whose KL term pulls every posterior towards the prior, gives digits. Measured by the mean distance from each
prior sample to its nearest held-out digit.

    python examples/ae_vs_vae.py [--quick] [--out outputs/examples/ae_vs_vae]
"""

from __future__ import annotations

import torch

from digits_vae import (DigitsVAE, TrainConfig, evaluate, example_parser, load_digit_splits,
                        mean_nearest_neighbour_distance, parse_example_args, plt, save_figure, show_grid, train)
from kl_autoencoder.inference import sample_prior


def project_2d(means: torch.Tensor) -> torch.Tensor:
    """The latent itself when it is 2-D, else its top-2 principal components."""
    if means.shape[1] == 2:
        return means
    centred = means - means.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser("ae_vs_vae", __doc__.splitlines()[0], steps=3000)
    parser.add_argument("--num-samples", type=int, default=500, help="prior samples for the distance measure")
    args = parse_example_args(parser, argv)
    data = load_digit_splits()
    cfg = TrainConfig(steps=args.steps, seed=args.seed)

    models, results = {}, {}
    for name, variational in (("AE", False), ("VAE", True)):
        torch.manual_seed(args.seed)
        model = DigitsVAE(latent_dim=args.latent_dim, hidden=args.hidden, variational=variational)
        train(model, data.train_x, None, cfg)
        z = sample_prior((args.num_samples, args.latent_dim), generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            samples = model.decode(z)
        stats = evaluate(model, data.test_x)
        models[name] = (model, samples, stats)
        results[name] = {"rec_mse": stats["rec_mse"],
                         "prior_sample_nn_distance": mean_nearest_neighbour_distance(samples, data.test_x)}
    # The floor: how far real (training) digits are from their nearest held-out digit.
    results["train_digits_nn_distance"] = mean_nearest_neighbour_distance(data.train_x[:args.num_samples], data.test_x)

    fig, axes = plt.subplots(3, 2, figsize=(8, 11))
    show_grid(axes[0, 0], data.test_x[:32], 8, "held-out digits")
    axes[0, 1].axis("off")
    for col, name in enumerate(("AE", "VAE")):
        model, samples, stats = models[name]
        with torch.no_grad():
            reconstructions = model.decode(stats["means"][:32])
        show_grid(axes[1, col], reconstructions, 8, f"{name} reconstructions (MSE {results[name]['rec_mse']:.4f})")
        show_grid(axes[2, col], samples[:32], 8,
                  f"{name} decodes of z ~ N(0, I) (NN dist {results[name]['prior_sample_nn_distance']:.2f})")
    plots = [save_figure(fig, args.out, "reconstructions_and_samples.png")]

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, name in zip(axes, ("AE", "VAE")):
        xy = project_2d(models[name][2]["means"]).numpy()
        points = ax.scatter(xy[:, 0], xy[:, 1], c=data.test_y.numpy(), cmap="tab10", s=10)
        ax.set_title(f"{name} latent means of held-out digits" + (" (top-2 PCs)" if args.latent_dim > 2 else ""))
    fig.colorbar(points, ax=axes[-1], label="digit")
    plots.append(save_figure(fig, args.out, "latent_2d.png"))

    for name in ("AE", "VAE"):
        r = results[name]
        print(f"{name:>3}: held-out reconstruction MSE {r['rec_mse']:.4f}, "
              f"prior samples' mean distance to nearest held-out digit {r['prior_sample_nn_distance']:.3f}")
    print(f"real training digits' mean distance to nearest held-out digit {results['train_digits_nn_distance']:.3f}")
    print("plots:", *plots)
    results["plots"] = plots
    return results


if __name__ == "__main__":
    main()
