"""`kl-autoencoder evaluate`: the options and the run are the evaluation package's; this adds the command."""

from __future__ import annotations

from kl_autoencoder.commands.common import UsageError


def cmd_evaluate(args) -> int:
    from kl_autoencoder import evaluation

    evaluation.run(args)  # writes metrics.json / report.md; errors surface as ValueError -> one-line message
    return 0


def add_parser(sub, with_evaluate: bool = True) -> None:
    """The `evaluate` subcommand; its options only `with_evaluate` (they import evaluation, lpips and torchmetrics)."""
    p = sub.add_parser("evaluate", help="reconstruction metrics, latent statistics, report")
    if with_evaluate:  # evaluation pulls in lpips / torchmetrics: only import it when it is the command
        try:
            from kl_autoencoder import evaluation
        except ImportError as err:
            raise UsageError(f"the evaluate command is unavailable: {err}") from err
        evaluation.add_arguments(p)
        p.set_defaults(func=cmd_evaluate)
