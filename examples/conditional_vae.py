"""Conditional VAE: feed the label to encoder and decoder, then ask the decoder for a chosen digit.

q(z | x, y) and p(x | z, y) both see the one-hot label, so z only has to hold what the label does not say (style:
slant, thickness). Decoding z ~ N(0, I) with label c draws a "c". A logistic regression fitted on the real training
digits checks that the generated digits are read as the requested class.

    python examples/conditional_vae.py [--quick] [--out outputs/examples/conditional_vae]
"""

from __future__ import annotations

import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from digits_vae import (NUM_CLASSES, DigitsVAE, TrainConfig, evaluate, example_parser, load_digit_splits,
                        parse_example_args, plt, save_figure, show_grid, train)
from kl_autoencoder.inference import sample_prior


def fit_digit_classifier(x: torch.Tensor, y: torch.Tensor) -> LogisticRegression:
    """An independent judge of the samples: a linear classifier on the real digits' pixels."""
    with threadpool_limits(1):  # a 64-feature fit: BLAS threads only fight each other on a busy CPU
        return LogisticRegression(max_iter=2000).fit(x.numpy(), y.numpy())


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser("conditional_vae", __doc__.splitlines()[0], steps=3000)
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--truncation", type=float, default=None, help="sample z from a truncated N(0, I)")
    args = parse_example_args(parser, argv)
    data = load_digit_splits()

    torch.manual_seed(args.seed)
    model = DigitsVAE(latent_dim=args.latent_dim, hidden=args.hidden, num_classes=NUM_CLASSES)
    train(model, data.train_x, data.train_y, TrainConfig(steps=args.steps, seed=args.seed))
    stats = evaluate(model, data.test_x, data.test_y)

    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.samples_per_class)
    z = sample_prior((len(labels), args.latent_dim), truncation=args.truncation,
                     generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        samples = model.decode(z, labels)

    classifier = fit_digit_classifier(data.train_x, data.train_y)
    predicted = torch.as_tensor(classifier.predict(samples.numpy()))
    per_class = [(predicted[labels == c] == c).float().mean().item() for c in range(NUM_CLASSES)]
    results = {
        "rec_mse": stats["rec_mse"],
        "classifier_heldout_accuracy": classifier.score(data.test_x.numpy(), data.test_y.numpy()),
        "generated_accuracy": (predicted == labels).float().mean().item(),
        "generated_accuracy_per_class": per_class,
    }

    fig, ax = plt.subplots(figsize=(6, 6))
    shown = torch.cat([samples[labels == c][:10] for c in range(NUM_CLASSES)])
    show_grid(ax, shown, 10, f"row c: decode(z ~ N(0, I), label c)  —  {results['generated_accuracy']:.0%} read as c")
    plots = [save_figure(fig, args.out, "samples_by_class.png")]

    print(f"held-out reconstruction MSE {results['rec_mse']:.4f}")
    print(f"logistic regression on real digits: held-out accuracy {results['classifier_heldout_accuracy']:.3f}")
    print(f"generated digits classified as the requested class: {results['generated_accuracy']:.3f} (chance 0.1); "
          "per class " + " ".join(f"{c}:{a:.2f}" for c, a in enumerate(per_class)))
    print("plots:", *plots)
    results["plots"] = plots
    return results


if __name__ == "__main__":
    main()
