"""Validation while training, the best checkpoint and the trackers: the figures are `evaluate`'s on the EMA weights,
on one process and on two (every image once); validating leaves the training bitwise unchanged and a kill during a
pass resumes exactly; the best checkpoint is kept, exported and named in summary.json; TensorBoard, wandb (offline),
mlflow (a local file store), comet_ml (offline), aim and trackio (local stores) receive the figures, pictures and
hyper-parameters through the real libraries."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kl_autoencoder.config import ConfigError, load_config
from kl_autoencoder.data import load_eval_images
from kl_autoencoder.evaluation import evaluate_model
from kl_autoencoder.model import KLAutoencoder
from kl_autoencoder.trainer import train
from tests.conftest import TINY_TRAINING
from tests.slow_validation_train import PAUSE_MARK

ROOT = Path(__file__).resolve().parent.parent
TINY = TINY_TRAINING + ["train.log_every=1", "train.checkpoint_every=0", "optim.lr=2e-3", "optim.betas=[0.9, 0.99]",
                        "train.scaling_images=8"]
VAL = ["validation.every=2", "validation.num_images=3", "validation.batch_size=2", "train.ema.enabled=true",
       "train.ema.decay=0.9"]
FIGURES = ("psnr", "ssim", "colour_error", "delta_e", "hue_error")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.usefixtures("one_thread")


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def val_lines(out: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "val/seconds"} for m in lines(out) if "val/psnr" in m]


def assert_figures_are_evaluates(export: Path, figures: dict, resolution: int = 32) -> None:
    """`figures` (a validation line) are what `evaluate` measures on the export: its functions, every held-out photo
    once, the exported (EMA) weights."""
    _, images = load_eval_images("sample:heldout", resolution)
    run = evaluate_model(KLAutoencoder.from_pretrained(export), "m", images, batch_size=3, progress=False)
    assert figures["val/num_images"] == len(images) == 3
    for key in FIGURES:
        assert figures[f"val/{key}"] == pytest.approx(run.metrics[key]["mean"], rel=1e-5, abs=1e-6), key
    # the latent spread: posterior samples, pooled (evaluate draws other noise: close, not equal)
    assert figures["val/scaling_factor"] == pytest.approx(run.metrics["latents"]["scaling_factor"], rel=0.05)
    assert figures["val/latent_std"] == pytest.approx(1 / figures["val/scaling_factor"])


# ----------------------------------------------------------------------------------------------- trackers' files


def wandb_records(folder: Path) -> list:
    """The records of wandb's offline run file (run-*.wandb: a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, parts, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def assert_trackers_got_it(out: Path, mlruns: Path, steps: list[int]) -> None:
    """TensorBoard, wandb and mlflow each hold val/psnr at `steps`, the validation picture and the config."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/psnr")] == steps
    assert [e.step for e in events.Images("validation")] == steps

    history = {}
    config = {}
    for record in wandb_records(out):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = items
        elif kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in update})
    assert [s for s, items in sorted(history.items()) if "val/psnr" in items] == steps
    assert all("validation/filenames" in history[s] for s in steps)  # the picture, as wandb.Image
    assert config["train.batch_size"] == 4 and config["validation.every"] == 2  # the config as hyper-parameters

    import mlflow

    client = mlflow.tracking.MlflowClient(f"file:{mlruns}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "kl-autoencoder"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr")] == steps
    assert run.data.params["train.batch_size"] == "4" and run.data.params["model.architecture.block_out_channels"]
    images = Path(run.info.artifact_uri.removeprefix("file://")) / "images"
    assert len([p for p in images.glob("validation*.png")]) == len(steps)


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch) -> Path:
    """wandb offline (run files under the run folder), mlflow in a local file store: nothing leaves the machine."""
    mlruns = tmp_path / "mlruns"
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": f"file:{mlruns}",
                       "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return mlruns


def comet_messages(folder: Path) -> list[dict]:
    """The messages of comet_ml's offline experiment archive (a zip holding messages.json, one JSON a line)."""
    import zipfile

    (archive,) = folder.glob("*.zip")
    with zipfile.ZipFile(archive) as zipped:
        return [json.loads(line) for line in zipped.read("messages.json").decode().splitlines()]


def test_comet_ml_offline_gets_the_figures_the_pictures_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("comet_ml")
    offline = tmp_path / "comet"
    for key, value in {"COMET_START_ONLINE": "false", "COMET_OFFLINE_DIRECTORY": str(offline),
                       "COMET_DISABLE_AUTO_LOGGING": "true"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    train(load_config(None, TINY + VAL + [f"train.output_dir={out}", "train.max_steps=4", "train.report_to=comet_ml"]))
    messages = comet_messages(offline)
    metrics = [m["payload"]["metric"] for m in messages if m["type"] == "metric_msg"]
    assert [m["step"] for m in metrics if m["metricName"] == "val/psnr"] == [2, 4]
    psnr = [m["metricValue"] for m in metrics if m["metricName"] == "val/psnr"]
    assert psnr == pytest.approx([m["val/psnr"] for m in val_lines(out)])
    params = {m["payload"]["param"]["paramName"]: m["payload"]["param"]["paramValue"] for m in messages
              if m["type"] == "parameter_msg"}
    assert params["train.batch_size"] == 4 and params["validation.every"] == 2
    images = [m["payload"]["additional_params"] for m in messages
              if m["type"] == "file_upload" and m["payload"].get("upload_type") == "visualization"]
    assert [(i["figName"], i["step"]) for i in images] == [("validation", 2), ("validation", 4)]


def test_comet_ml_online_without_a_key_is_a_one_line_error_naming_the_offline_setting(tmp_path):
    pytest.importorskip("comet_ml")
    out = tmp_path / "run"
    env = {k: v for k, v in ENV.items() if not k.startswith("COMET_")}
    args = [*TINY, f"train.output_dir={out}", "train.max_steps=2", "train.report_to=comet_ml"]
    done = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), *args], cwd=ROOT,
                          env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=300)  # no key anywhere: comet_ml refuses at start
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert "train.report_to=comet_ml: a tracker did not start: " in line and "API key" in line
    assert line.endswith("(offline: comet_ml: COMET_START_ONLINE=false)")


def test_aim_gets_the_figures_the_pictures_and_the_config_in_the_run_folder(tmp_path):
    pytest.importorskip("aim")
    from aim import Repo
    from aim.sdk.index_manager import RepoIndexManager
    from aim.storage.context import Context

    out = tmp_path / "run"
    train(load_config(None, TINY + VAL + [f"train.output_dir={out}", "train.max_steps=4", "train.report_to=aim"]))
    repo = Repo(str(out))  # the repository in out/.aim
    (run_hash,) = repo.list_all_runs()
    RepoIndexManager.get_index_manager(repo).index(run_hash)  # what `aim up` does before it shows a run
    run = repo.get_run(run_hash)
    steps, (psnr, *_) = run.get_metric("val/psnr", Context({})).data.items_list()
    assert steps == [2, 4] and psnr == pytest.approx([m["val/psnr"] for m in val_lines(out)])
    assert run["hparams"]["train.batch_size"] == 4 and run["hparams"]["validation.every"] == 2
    # the first batch's 2 photos over their 2 reconstructions, 32 px each, make_grid's 2 px padding: 70 x 70
    images = run.get_image_sequence("validation", Context({})).data.items_list()
    assert images[0] == [2, 4] and [i.to_pil_image().size for i in images[1][0]] == [(70, 70)] * 2


def test_trackio_gets_the_figures_the_pictures_and_the_config_in_its_local_store(tmp_path):
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed")
    out, store = tmp_path / "run", tmp_path / "trackio"  # trackio reads TRACKIO_DIR once, at import: a fresh process
    args = [*TINY, *VAL, f"train.output_dir={out}", "train.max_steps=4", "train.report_to=trackio"]
    done = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), *args], cwd=ROOT,
                          env={**ENV, "TRACKIO_DIR": str(store)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with sqlite3.connect(store / "kl-autoencoder.db") as db:  # trackio's store: one SQLite file per project
        logs = [(step, json.loads(values)) for step, values in db.execute("SELECT step, metrics FROM metrics")]
        ((config,),) = db.execute("SELECT config FROM configs").fetchall()
    assert [(s, v["val/psnr"]) for s, v in logs if "val/psnr" in v] == [(m["step"], pytest.approx(m["val/psnr"]))
                                                                       for m in val_lines(out)]
    assert json.loads(config)["train.batch_size"] == 4 and json.loads(config)["validation.every"] == 2
    images = [(s, v["validation"]) for s, v in logs if "validation" in v]
    assert [s for s, _ in images] == [2, 4] and all(i["_type"] == "trackio.image" for _, i in images)
    assert all(Image.open(store / "media" / i["file_path"]).size == (70, 70) for _, i in images)


# ----------------------------------------------------------------------------------------------- one process


def test_validation_measures_what_evaluate_does_and_reaches_every_tracker(tmp_path, offline_trackers, capsys):
    out = tmp_path / "run"
    export = train(load_config(None, TINY + VAL + [
        f"train.output_dir={out}", "train.max_steps=4", "train.report_to=[tensorboard, wandb, mlflow]"]))
    figures = val_lines(out)
    assert [m["step"] for m in figures] == [2, 4]
    assert_figures_are_evaluates(export, figures[-1])  # step 4's pass measured the EMA weights the export holds
    assert "val_psnr=" + f"{figures[-1]['val/psnr']:.4g}" in capsys.readouterr().err  # the progress bar
    assert_trackers_got_it(out, offline_trackers, [2, 4])


def test_lpips_is_measured_when_its_weights_are_there(tmp_path, monkeypatch):
    """With an LPIPS network available (here lpips' own, on a random backbone seeded alike: the pretrained one is
    not cached on the test machine) the pass reports val/lpips, evaluate's figure on the export; without, none."""
    import lpips

    from kl_autoencoder import metrics as M

    def network() -> torch.nn.Module:
        torch.manual_seed(0)
        return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)

    real = M.LPIPSMetric
    monkeypatch.setattr(M, "LPIPSMetric", lambda net, device: real(net, device, network=network()))
    out = tmp_path / "run"
    export = train(load_config(None, TINY + VAL + [f"train.output_dir={out}", "train.max_steps=2",
                                                   "validation.keep_best=lpips"]))
    (figures,) = val_lines(out)
    _, images = load_eval_images("sample:heldout", 32)
    reference = evaluate_model(KLAutoencoder.from_pretrained(export), "m", images, progress=False,
                               lpips_metric=real("alex", "cpu", network=network()))
    assert figures["val/lpips"] == pytest.approx(reference.metrics["lpips"]["mean"], rel=1e-5)
    assert json.loads((out / "summary.json").read_text())["best"]["metric"] == "lpips"


def test_validating_leaves_the_training_bitwise_unchanged(tmp_path):
    """Weights, EMA, optimizer moments and every logged loss after 4 steps: identical with a pass at every step
    (and a best checkpoint written at most of them) and without any."""
    run = TINY + ["train.max_steps=4", "train.ema.enabled=true", "data.random_flip=true", "data.random_hue=0.5"]
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    train(load_config(None, run + [f"train.output_dir={plain}"]))
    train(load_config(None, run + [f"train.output_dir={watched}", "validation.every=1", "validation.num_images=3",
                                   "validation.keep_best=colour_error"]))
    assert len(val_lines(watched)) == 4
    for name in ("model", "ema", "optimizer"):
        a = load_file(plain / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        b = load_file(watched / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    train_lines = [[{k: v for k, v in m.items() if k != "images_per_second"} for m in lines(o) if "loss" in m]
                   for o in (plain, watched)]
    assert train_lines[0] == train_lines[1]


def test_the_best_checkpoint_is_kept_exported_and_named_in_the_summary(tmp_path):
    out = tmp_path / "run"
    train(load_config(None, TINY + VAL + [
        f"train.output_dir={out}", "train.max_steps=6", "validation.every=1", "train.checkpoint_every=2",
        "train.keep_checkpoints=1", "validation.keep_best=colour_error", "validation.export_best=true",
        "optim.lr=5e-3"]))
    figures = val_lines(out)
    errors = [m["val/colour_error"] for m in figures]
    best_step = figures[errors.index(min(errors))]["step"]  # lower is better for the colour error
    assert best_step != 6, errors  # (the test is only telling when the best is not the last step)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == [f"best_step_{best_step:07d}", "latest", "step_0000006"]  # the best is never pruned
    best = json.loads((out / "summary.json").read_text())["best"]
    assert best["step"] == best_step and best["metric"] == "colour_error" and best["value"] == min(errors)
    assert best["export"] == str(out / "vae-best")
    exported = evaluate_model(KLAutoencoder.from_pretrained(out / "vae-best"), "best",
                              load_eval_images("sample:heldout", 32)[1], progress=False)
    assert exported.metrics["colour_error"]["mean"] == pytest.approx(min(errors), rel=1e-5)


# ----------------------------------------------------------------------------------------------- faults


def test_a_kill_during_validation_resumes_exactly(tmp_path):
    """SIGKILL in the second pass (step 4, after the step-3 checkpoint): resuming replays steps 4-6 and their
    passes; weights, validation figures and the best checkpoint are a straight run's."""
    run = TINY + VAL + ["train.max_steps=6", "train.checkpoint_every=3", "validation.keep_best=psnr"]
    straight = tmp_path / "straight"
    train(load_config(None, run + [f"train.output_dir={straight}"]))

    out = tmp_path / "killed"
    args = run + [f"train.output_dir={out}", "train.resume=latest"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_validation_train.py"), *args], cwd=ROOT,
                            env={**ENV, "VAL_PAUSE_AT": "2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if line.startswith(PAUSE_MARK):
            break
    else:
        raise AssertionError(f"the run ended without pausing in validation: {proc.communicate()}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert (out / "checkpoints" / "step_0000003").is_dir() and not (out / "checkpoints" / "step_0000006").exists()
    assert [m["step"] for m in val_lines(out)] == [2]

    done = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert val_lines(out) == val_lines(straight)
    for name in ("model", "ema"):
        a = load_file(straight / "checkpoints" / "step_0000006" / f"{name}.safetensors")
        b = load_file(out / "checkpoints" / "step_0000006" / f"{name}.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name
    summaries = [json.loads((o / "summary.json").read_text())["best"] for o in (straight, out)]
    assert summaries[0]["step"] == summaries[1]["step"] and summaries[0]["value"] == summaries[1]["value"]


# ----------------------------------------------------------------------------------------------- two processes


def test_two_processes_validate_each_image_once_and_report_to_the_trackers(tmp_path, offline_trackers):
    """2 ranks, 3 images in batches of 1 (rank 0 takes two, rank 1 one): one line per pass, the figures of all three
    images (evaluate's on the export), and each tracker written once, by the main process."""
    from tests.test_gan_ddp import free_port

    out, mlruns = tmp_path / "ddp", offline_trackers
    env = {**os.environ, **{k: ENV[k] for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "PYTHONPATH")},
           "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "training" / "train.py"),
           *TINY, *VAL, "validation.batch_size=1", "train.max_steps=4", f"train.output_dir={out}",
           "train.report_to=tensorboard,wandb,mlflow", "validation.keep_best=psnr"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = val_lines(out)
    assert [m["step"] for m in figures] == [2, 4]
    assert_figures_are_evaluates(out / "vae", figures[-1])
    assert_trackers_got_it(out, mlruns, [2, 4])
    assert json.loads((out / "summary.json").read_text())["best"]["step"] in (2, 4)


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, expected", [
    (["data.source={folder}", "validation.every=10", "validation.keep_best=psnr"],
     "'validation.source' = None: validation.keep_best=psnr needs held-out images"),
    (["validation.every=10", "validation.keep_best=fid"], "'validation.keep_best' = 'fid': names the validation"),
    (["validation.keep_best=psnr"], "'validation.keep_best' = 'psnr': needs validation passes"),
    (["validation.every=10", "validation.export_best=true"], "'validation.export_best' = True: exports the best"),
    (["validation.every=10", "model.architecture.block_out_channels=[8, 16]", "model.architecture.norm_num_groups=4",
      "data.resolution=32", "validation.resolution=31"],
     "'validation.resolution' = 31: must be divisible by the downsampling factor 2"),
    (["validation.every=10", "validation.source=sampel"], "'validation.source' = 'sampel': is neither"),
    (["train.report_to=wandbb"], "'train.report_to' = 'wandbb': unknown tracker 'wandbb'"),
    (["train.report_to=[tensorboard, comet_ml]"], "the comet_ml tracker is not installed: pip install comet-ml"),
])
def test_bad_validation_and_tracker_settings_are_one_line_errors(tmp_path, overrides, expected):
    pytest.importorskip("wandb")
    if any("comet_ml" in o for o in overrides) and __import__("importlib").util.find_spec("comet_ml"):
        pytest.skip("comet_ml is installed here")
    folder = tmp_path / "photos"
    folder.mkdir()
    with pytest.raises(ConfigError) as err:
        load_config(None, [o.format(folder=folder) for o in overrides])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_report_to_none_trains_without_trackers(tmp_path):
    out = tmp_path / "run"
    train(load_config(None, TINY + VAL + [f"train.output_dir={out}", "train.max_steps=2", "train.report_to=none"]))
    assert not (out / "tensorboard").exists() and [m["step"] for m in val_lines(out)] == [2]


def test_a_folder_without_a_validation_source_trains_without_passes_and_says_so(tmp_path, capsys):
    """The quickstart (validation every 300 steps) pointed at your own folder: no held-out images, so no passes."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    train(load_config(None, TINY + VAL + [f"train.output_dir={out}", "train.max_steps=2", f"data.source={folder}"]))
    assert val_lines(out) == [] and "no held-out images: no validation passes" in capsys.readouterr().out


def test_a_validation_source_without_images_fails_before_anything_is_written(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="validation.source=.*no image files"):
        train(load_config(None, TINY + VAL + [f"train.output_dir={out}", f"validation.source={empty}"]))
    assert not out.exists()
