"""beta-VAE: weighting the KL term by beta trades reconstruction for a simpler latent.

The same VAE trained at several beta: as beta grows the KL (the rate, in nats) falls, the reconstruction error (the
distortion) rises, and fewer latent units carry information (per-unit KL, `metrics.active_units`). Traversals
show what each of the most informative units encodes.

    python examples/beta_vae.py [--betas 0.5 1 4] [--quick] [--out outputs/examples/beta_vae]
"""

from __future__ import annotations

import torch

from digits_vae import (DigitsVAE, TrainConfig, evaluate, example_parser, load_digit_splits, parse_example_args, plt,
                        save_figure, show_grid, train)


def latent_traversal(model: DigitsVAE, base: torch.Tensor, units: list[int], values: torch.Tensor) -> torch.Tensor:
    """Decode `base` (one latent [D]) with unit u set to each of `values`, for u in `units`: [len(units) * V, 64]."""
    rows = []
    for unit in units:
        z = base.repeat(len(values), 1)
        z[:, unit] = values
        rows.append(z)
    with torch.no_grad():
        return model.decode(torch.cat(rows))


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser("beta_vae", __doc__.splitlines()[0], steps=3000)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 4.0])
    parser.add_argument("--traversal-units", type=int, default=4, help="units (by KL) shown in the traversals")
    args = parse_example_args(parser, argv)
    data = load_digit_splits()

    results: dict = {"betas": args.betas, "rec_mse": [], "distortion": [], "kl": [], "active_units": [],
                     "kl_per_unit": []}
    models = []
    for beta in args.betas:
        torch.manual_seed(args.seed)
        model = DigitsVAE(latent_dim=args.latent_dim, hidden=args.hidden)
        train(model, data.train_x, None, TrainConfig(steps=args.steps, kl_weight=beta, seed=args.seed))
        stats = evaluate(model, data.test_x)
        models.append((model, stats))
        for key in ("rec_mse", "distortion", "kl", "active_units"):
            results[key].append(stats[key])
        results["kl_per_unit"].append(stats["kl_per_unit"].tolist())
        print(f"beta {beta:>4g}: held-out distortion (MSE of decodes of z ~ q(z|x)) {stats['distortion']:.4f}, "
              f"reconstruction MSE (of the mean) {stats['rec_mse']:.4f}, KL {stats['kl']:.2f} nats, "
              f"active units {stats['active_units']}/{args.latent_dim}, KL per unit "
              + " ".join(f"{v:.2f}" for v in stats["kl_per_unit"].tolist()))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(results["kl"], results["distortion"], "o-", label="decodes of z ~ q(z|x)")
    axes[0].plot(results["kl"], results["rec_mse"], "s--", label="decode of the posterior mean")
    for beta, kl, distortion in zip(args.betas, results["kl"], results["distortion"]):
        axes[0].annotate(f"beta={beta:g}", (kl, distortion), textcoords="offset points", xytext=(5, 5))
    axes[0].set(xlabel="KL (rate, nats)", ylabel="held-out MSE (distortion)", title="rate vs distortion")
    axes[0].legend()
    width = 0.8 / len(args.betas)
    for i, (beta, kl_units) in enumerate(zip(args.betas, results["kl_per_unit"])):
        positions = [u + i * width for u in range(args.latent_dim)]
        axes[1].bar(positions, kl_units, width, label=f"beta={beta:g} ({results['active_units'][i]} active)")
    axes[1].set(xlabel="latent unit", ylabel="KL (nats)", title="KL per latent unit")
    axes[1].legend()
    plots = [save_figure(fig, args.out, "rate_distortion.png")]

    values = torch.linspace(-3, 3, 9)
    fig, axes = plt.subplots(1, len(args.betas), figsize=(4 * len(args.betas), 3))
    for ax, beta, (model, stats) in zip(list(axes) if len(args.betas) > 1 else [axes], args.betas, models):
        units = stats["kl_per_unit"].argsort(descending=True)[:args.traversal_units].tolist()
        images = latent_traversal(model, stats["means"][0], units, values)
        show_grid(ax, images, len(values), f"beta={beta:g}: units {units} from -3 to 3")
    plots.append(save_figure(fig, args.out, "traversals.png"))
    print("plots:", *plots)
    results["plots"] = plots
    return results


if __name__ == "__main__":
    main()
