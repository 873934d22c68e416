"""Posterior collapse, and the two standard cures: KL warm-up and free bits.

An autoregressive decoder p(x_i | x_<i, z) can model a digit from its own earlier pixels, so the latent is worth
little to it. With the full KL weight from step 0 the KL term wins before the encoder has learnt anything useful:
every q(z|x) is pushed onto the prior, the decoder learns to ignore z, and the latent never comes back (active units
-> 0 by `metrics.active_units`). The same model trained with a linear KL warm-up (`losses.kl_weight_at`) and free
bits (`losses.kl_loss(free_bits=...)`: each unit's first nats are free) keeps an informative latent. A plain MLP
decoder at the same KL weight is shown for reference: it cannot do without z, so it never collapses.

    python examples/posterior_collapse.py [--quick] [--out outputs/examples/posterior_collapse]
"""

from __future__ import annotations

import torch

from digits_vae import (DigitsVAE, TrainConfig, evaluate, example_parser, load_digit_splits, parse_example_args, plt,
                        save_figure, train)


def runs(args) -> dict[str, tuple[str, TrainConfig]]:
    """name -> (decoder, training config): the same KL weight everywhere, only the decoder and the schedule differ."""
    full = TrainConfig(steps=args.steps, kl_weight=args.kl_weight, seed=args.seed)
    cured = TrainConfig(steps=args.steps, kl_weight=args.kl_weight, seed=args.seed,
                        warmup_steps=int(args.warmup_fraction * args.steps), free_bits=args.free_bits)
    named = {
        "collapsed (autoregressive decoder, full KL from step 0)": ("autoregressive", full),
        "warm-up + free bits (autoregressive decoder)": ("autoregressive", cured),
    }
    if not args.skip_reference:
        named["reference (MLP decoder, full KL from step 0)"] = ("mlp", full)
    return named


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser("posterior_collapse", __doc__.splitlines()[0], steps=2400)
    parser.add_argument("--kl-weight", type=float, default=24.0, help="beta, the same for every run")
    parser.add_argument("--warmup-fraction", type=float, default=0.5, help="of the steps, for the cured run")
    parser.add_argument("--free-bits", type=float, default=1.0, help="nats per latent unit, for the cured run")
    parser.add_argument("--skip-reference", action="store_true", help="do not train the MLP-decoder reference")
    args = parse_example_args(parser, argv)
    data = load_digit_splits()

    results, histories = {}, {}
    for name, (decoder, cfg) in runs(args).items():
        torch.manual_seed(args.seed)
        model = DigitsVAE(latent_dim=args.latent_dim, hidden=args.hidden, decoder=decoder)
        histories[name] = train(model, data.train_x, None, cfg, log_every=max(1, args.steps // 60))
        stats = evaluate(model, data.test_x)
        results[name] = {"active_units": stats["active_units"], "kl": stats["kl"], "rec_mse": stats["rec_mse"],
                         "unit_activity": stats["unit_activity"].tolist()}
        print(f"{name}: active units {stats['active_units']}/{args.latent_dim}, KL {stats['kl']:.2f} nats, "
              f"held-out next-pixel / reconstruction MSE {stats['rec_mse']:.4f}")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, history in histories.items():
        axes[0].plot([h["step"] for h in history], [h["kl"] for h in history], label=name)
    axes[0].set(xlabel="step", ylabel="KL (nats, training batch)",
                title=f"KL during training (beta={args.kl_weight:g})")
    axes[0].legend(fontsize=7)
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        positions = [u + i * width for u in range(args.latent_dim)]
        axes[1].bar(positions, r["unit_activity"], width, label=f"{name.split(' (')[0]}: {r['active_units']} active")
    axes[1].axhline(0.01, color="gray", linestyle="--", linewidth=1)
    axes[1].set(yscale="log", xlabel="latent unit", ylabel="Var_x E[z | x]", title="unit activity (threshold 0.01)")
    axes[1].legend(fontsize=7)
    plots = [save_figure(fig, args.out, "collapse.png")]
    print("plots:", *plots)
    return {"runs": results, "plots": plots}


if __name__ == "__main__":
    main()
