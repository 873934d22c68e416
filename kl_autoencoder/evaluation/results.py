"""metrics.json's content beyond the models' entries (the header, the headline) and writing the results.

metrics.json and report.md (rendered by report.py) and the spectra picture, written once every model is
measured. Below orchestration.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kl_autoencoder import diffusability as D
from kl_autoencoder import metrics as M
from kl_autoencoder.durable import atomic_write_text
from kl_autoencoder.evaluation.pictures import save_figure
from kl_autoencoder.evaluation.report import render_report, write_json
from kl_autoencoder.evaluation.scores import IMAGE_METRICS
from kl_autoencoder.evaluation.splits import EvalImages


def result_header(data: str, resolution: int, images: EvalImages, sample: bool, skip: tuple[str, ...]
                  ) -> dict[str, Any]:
    """metrics.json's fields about the evaluation itself; the models' entries go into its "models"."""
    return {
        "data": data, "resolution": resolution, "num_images": len(images.names), "sample_posterior": sample,
        "available_images": images.available, "skipped_sections": list(skip),
        "splits": {split: [images.names[i] for i in indices] for split, indices in images.splits.items()},
        "skipped_images": len(images.skipped), "skipped_files": sorted(images.skipped),
        "skip_reasons": images.skipped, "latent_definitions": M.LATENT_STATISTICS_DOC, "models": {},
    }


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The first split's image metrics per model: the held-out images when the source has them."""
    split = next(iter(result["splits"]))
    return {"split": split, "num_images": len(result["splits"][split]),
            "models": {m: {k: e["splits"][split][k] for k in IMAGE_METRICS} for m, e in result["models"].items()}}


def write_results(result: dict[str, Any], image_names: list[str], out: Path) -> dict[str, Any]:
    """Complete `result` (headline, image names, the spectra picture) and write metrics.json and report.md."""
    result["headline"] = headline(result)
    result["image_names"] = image_names
    spectra = {m: e["diffusability"] for m, e in result["models"].items() if e["diffusability"] is not None}
    if spectra:
        result["diffusability_picture"] = save_figure(D.plot_spectra(spectra), out / "spectra.png").name
    write_json(out / "metrics.json", result)
    atomic_write_text(out / "report.md", render_report(result))
    return result
