"""Evaluate one or more autoencoders on the same images: metrics.json, report.md and pictures.

Every model is loaded and checked before any work, so a bad path fails before a picture is written. Then, per
model: reconstruct each image (posterior mode, or a sample with `sample=True`), score it (PSNR, SSIM, MS-SSIM,
LPIPS, rFID; colour: the mean-RGB error, ΔE2000 per pixel and the hue error on saturated pixels; see metrics.py),
stream the latent statistics a diffusion model needs (the recommended scaling /
shift factors from metrics' one latent-scale estimator, per-channel moments and KL, active units) and time encode
and decode.

Images come in splits, reported separately and held-out first: the built-in `sample` source is its held-out
photos, then its training photos (data.SAMPLE_HELDOUT / SAMPLE_TRAIN); any other source is one split, "all".
The headline (report.md's first line, metrics.json's "headline") is the first split: the held-out one when there
is one.

    metrics.json                  "headline", "splits" (image names per split), "skipped_images" / "skipped_files",
                                  "models": {name: per-model dict}; strict JSON (inf -> "inf"). A per-model dict
                                  holds psnr / ssim / ms_ssim / lpips / colour_error / delta_e / hue_error / rfid
                                  over all images, "splits": the image metrics per split, "latents", "speed",
                                  "worst" (lowest PSNR), "worst_colour" (largest ΔE2000), "warnings", "pictures"
    report.md                     the sections of REPORT_SECTIONS, in order
    <model>/reconstructions.png   original | reconstruction | error, for the first images
    <model>/worst.png             the same for the images with the lowest PSNR
    <model>/latent_histograms.png per-channel histogram of diffusion-scaled latents against the N(0, 1) pdf
    <model>/latent_channels.png   posterior-mean channels of the first images
    spectra.png                   latent vs image power spectra of every model (diffusability)

Diffusability (kl_autoencoder/diffusability.py), per model under "diffusability": the high-frequency share of the
latent and image spectra and the equivariance PSNR, always; with `diffusability_probe=True` the probe's held-out
denoising loss too (it trains a small UNet: about a minute per quickstart-size VAE on a CPU).

`write_config=True` stores the measured scaling_factor / shift_factor (and with `write_latent_stats` the
per-channel latents_mean / latents_std) into the model folder's config.json.

Tiny autoencoders (a diffusers `AutoencoderTiny` folder, e.g. from `kl-autoencoder distill`) are evaluated beside
KL VAEs: the same image metrics (encode then decode) and speed; latent statistics and diffusability do not apply (its
encoder outputs the teacher's diffusion latents directly, there is no posterior). With its teacher among the models
(or `teacher=`), its entry's "teacher" holds PSNR / SSIM against the teacher's decodes (`compare_with_teacher`) and
report.md a section for it.

The package is one room per concern; `orchestration` joins them, no room imports this `__init__`, and every name is
re-exported here, so `from kl_autoencoder.evaluation import X` is the public way in:

    orchestration.py  `evaluate`, and `run` for the command line   splits.py     the images in splits; held-out
    arguments.py      the command-line flags                         one_pass.py   one model's pass (timed)
    models.py         loading and naming the models                  teacher.py    tiny autoencoder vs its teacher
    scores.py         per-image scores and summaries                 results.py    metrics.json's header, writing
    latent_config.py  --write-config (config.json)                   pictures.py   the pictures
    report.py         report.md, strict JSON                         errors.py     EvaluationError
"""

from kl_autoencoder.evaluation.arguments import EVALUATION_FILES, SHIFT_CHOICES, SKIPPABLE, add_arguments, skip_sections
from kl_autoencoder.evaluation.errors import EvaluationError
from kl_autoencoder.evaluation.latent_config import check_latent_scale_writable, config_json_for, write_latent_config
from kl_autoencoder.evaluation.models import (
    check_resolution, is_tiny_autoencoder, load_model_for_eval, load_models, model_names, same_model_path,
)
from kl_autoencoder.evaluation.one_pass import (
    GRID_IMAGES, KEPT_LATENTS, LATENT_IMAGES, ModelRun, TINY_LATENTS_REASON, Timing, collapse_warning,
    evaluate_model, _reconstruct,
)
from kl_autoencoder.evaluation.orchestration import (
    check_request, diffusability_entry, evaluate, latent_detail, model_sections_entry, run, status,
)
from kl_autoencoder.evaluation.pictures import (
    ImageRecord, image_labels, plot_latent_channels, plot_latent_histograms, plot_reconstructions, save_figure,
    write_pictures,
)
from kl_autoencoder.evaluation.report import (
    ALL, HELD_OUT, REPORT_SECTIONS, ReportSection, TRAINING, channel_table, headline_scope, headline_section,
    image_metrics_section, model_sections, notes_section, render_report, skipped_section, teacher_section,
    whole_set_section, write_json, _fmt, _plural,
)
from kl_autoencoder.evaluation.results import headline, result_header, write_results
from kl_autoencoder.evaluation.scores import (
    IMAGE_METRICS, ImageScores, LowestPSNR, rfid_entry, split_summaries, summarize_defined, worst_colour,
)
from kl_autoencoder.evaluation.splits import (
    EvalImages, available_images, describe_images, heldout_warnings, load_split_images, split_sources, trained_on,
)
from kl_autoencoder.evaluation.teacher import compare_with_teacher, find_teacher
