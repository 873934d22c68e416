"""The benchmark harness: interleaving, memory measurement and table bookkeeping, plus a tiny end-to-end run."""

import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run as bench  # noqa: E402  (benchmarks/run.py)


def test_interleaved_times_alternate_order_and_exclude_warmup():
    calls = []
    fns = {"ours": lambda: calls.append("ours"), "reference": lambda: calls.append("reference")}
    times = bench.interleaved_times(fns, repeats=3, device=torch.device("cpu"), warmup=1)
    assert calls == ["ours", "reference",  # warm-up
                     "ours", "reference", "reference", "ours", "ours", "reference"]
    assert [len(v) for v in times.values()] == [3, 3]


def test_peak_memory_counts_the_high_water_mark_of_new_tensors():
    held = torch.zeros(1 << 20)  # pre-existing: not counted

    def step():
        a = torch.ones(1 << 18)  # 1 MiB
        b = torch.ones(1 << 19)  # 2 MiB, while a is alive -> peak 3 MiB
        del a, b
        c = torch.ones(1 << 18)  # 1 MiB after both are freed
        return c.sum() + held[0]

    peak = bench.peak_memory_bytes(step, torch.device("cpu"))
    assert 3 * 2**20 <= peak < 3 * 2**20 + 64 * 1024


def parse_table(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("measurement", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_table_ratio_is_computed_from_the_medians_shown():
    rows = [bench.Row("train step", "images/s", 12.3456, 9.87654), bench.Row("decode", "images/s", 150.4, 99.6),
            bench.Row("data pipeline", "images/s", 500.0, None)]
    table = parse_table(bench.markdown_table(rows))
    assert table["train step"] == ["images/s", "12.3", "9.88", f"{12.3 / 9.88:.2f}x"]
    assert table["decode"] == ["images/s", "150", "99.6", f"{150 / 99.6:.2f}x"]
    assert table["data pipeline"][2:] == ["-", "-"]
    assert bench.ratio_line(rows).endswith("train step: 1.24x, decode: 1.51x")


def test_tiny_end_to_end_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(["--tiny", "--repeats", "1", "--only", "train,encode", "--no-memory", "--breakdown",
                         "--json", str(out)])
    printed = capsys.readouterr().out
    table = parse_table(printed)
    for name in ("train step", "train step without LPIPS", "LPIPS forward + backward", "encode", "decode",
                 "tiled decode 128x128"):
        unit, ours, reference, ratio = table[name]
        assert float(ours) > 0 and float(reference) > 0
        assert ratio == f"{float(ours) / float(reference):.2f}x"
    # medians shown come from the raw timings: images/s = batch / median seconds
    seconds = result["seconds"]["train_seconds"]
    assert float(table["train step"][1]) == float(bench.format_value(2 / seconds["ours"][0]))
    parts = result["seconds"]["breakdown_seconds"]
    assert sorted(parts) == ["lpips_ours", "lpips_reference", "vae_ours", "vae_reference"]
    assert float(table["LPIPS forward + backward"][2]) == float(bench.format_value(2 / parts["lpips_reference"][0]))
    assert printed.strip().splitlines()[-1].startswith("ratio ours/reference")
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["rows"]] == [r["name"] for r in result["rows"]]
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", saved["header"])  # dated
    assert saved["train_flops_per_image"] > 0


def test_fast_override_parses_each_kind_of_switch_and_names_bad_input():
    import pytest

    assert bench.fast_override("channels_last=false") == ("channels_last", False)
    assert bench.fast_override("loss_channels_last=on") == ("loss_channels_last", True)
    assert bench.fast_override("autocast_dtype=bfloat16") == ("autocast_dtype", torch.bfloat16)
    assert bench.fast_override("autocast_dtype=none") == ("autocast_dtype", None)
    assert bench.fast_override("compile_mode=max-autotune") == ("compile_mode", "max-autotune")
    with pytest.raises(SystemExit, match="channel_last"):
        bench.fast_override("channel_last=true")  # misspelt field: named, with the valid ones
    with pytest.raises(SystemExit, match="true or false"):
        bench.fast_override("channels_last=maybe")
    with pytest.raises(SystemExit, match="torch dtype"):
        bench.fast_override("autocast_dtype=float99")
    setup = bench.load_setup(bench.parse_args(["--tiny", "--fast", "channels_last=false"]))
    assert not setup.fast.channels_last and not setup.train_fast.channels_last
    setup = bench.load_setup(bench.parse_args(["--tiny"]))
    assert setup.fast.channels_last and not setup.train_fast.channels_last  # CPU: NHWC inference, NCHW training


def test_reference_step_skips_lpips_at_weight_zero_and_uses_it_otherwise():
    import reference as ref

    torch.manual_seed(0)
    vae = ref.build_reference_vae(dict(bench.TINY_ARCHITECTURE,
                                       down_block_types=["DownEncoderBlock2D"] * 2,
                                       up_block_types=["UpDecoderBlock2D"] * 2))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    calls = []

    def lpips_model(a, b):
        calls.append(a.shape)
        return (a - b).abs().mean(dim=(1, 2, 3))

    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    ref.reference_training_step(vae, lpips_model, optimizer, x, perceptual_weight=0.0)
    assert calls == []
    ref.reference_training_step(vae, lpips_model, optimizer, x, perceptual_weight=1.0)
    assert calls == [x.shape]


def test_tiled_row_takes_image_and_tile_sizes(capsys):
    import pytest

    result = bench.main(["--tiny", "--repeats", "1", "--only", "encode", "--tiled-size", "64", "--tile-size", "32"])
    names = [row["name"] for row in result["rows"]]
    assert "tiled decode 64x64 (tile 32)" in names
    assert "tiled decode 64x64 (tile 32), global norms (default) peak memory" in names
    memory = {row["name"]: row for row in result["rows"]}["tiled decode 64x64 (tile 32) peak memory"]
    assert memory["ours"] > 0 and memory["reference"] > 0
    with pytest.raises(SystemExit, match="multiples of the downsampling factor 2"):
        bench.main(["--tiny", "--repeats", "1", "--only", "encode", "--no-memory", "--tiled-size", "33"])


def test_tiled_memory_script_measures_each_method_in_a_subprocess(tmp_path):
    import tiled_memory  # benchmarks/tiled_memory.py

    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  architecture:\n    block_out_channels: [8, 16]\n    norm_num_groups: 4\n"
                      "    layers_per_block: 1\n    mid_block_add_attention: false\n"
                      "data:\n  resolution: 32\n")
    out = tmp_path / "tiled.json"
    results = tiled_memory.main(["--config", str(config), "--sizes", "64", "--tile", "32", "--json", str(out)])
    assert [r["method"] for r in results] == ["ours", "ours-plain", "diffusers"]
    for r in results:  # each decoded a 64x64 image (asserted in the subprocess) and was timed
        assert r["size"] == 64 and r["tile"] == 32 and r["seconds"] > 0 and r["peak_mib"] >= 0
    assert json.loads(out.read_text()) == results


def test_benchmark_and_train_run_the_same_step_function(tmp_path, monkeypatch):
    """benchmarks/run.py times trainer.train_step on trainer.build_training, the very function train() runs."""
    from kl_autoencoder import trainer
    from kl_autoencoder.config import load_config

    callers = []
    real_step = trainer.train_step

    def recording_step(t, x, step, micro=0):
        callers.append(type(t).__name__)
        return real_step(t, x, step, micro)

    monkeypatch.setattr(trainer, "train_step", recording_step)
    bench.main(["--tiny", "--repeats", "1", "--only", "train", "--no-memory"])
    from_benchmark = len(callers)
    assert from_benchmark >= 2  # warm-up + one timed round
    trainer.train(load_config(None, [
        "model.architecture.block_out_channels=[8, 16]", "model.architecture.norm_num_groups=4",
        "model.architecture.layers_per_block=1", "data.resolution=32", "data.num_workers=0",
        "loss.perceptual_weight=0", "train.batch_size=2", "train.max_steps=2", "train.scaling_images=4",
        f"train.output_dir={tmp_path / 'run'}"]))
    assert len(callers) == from_benchmark + 2 and set(callers) == {"Training"}
