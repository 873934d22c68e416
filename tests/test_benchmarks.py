"""The benchmark harness: interleaving, memory measurement and table bookkeeping, plus a tiny end-to-end run."""

import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402  (benchmarks/harness.py)
import measure  # noqa: E402  (benchmarks/measure.py)
import run as bench  # noqa: E402  (benchmarks/run.py)


def test_interleaved_times_alternate_order_and_exclude_warmup():
    calls = []
    fns = {"ours": lambda: calls.append("ours"), "reference": lambda: calls.append("reference")}
    times = measure.interleaved_times(fns, repeats=3, device=torch.device("cpu"), warmup=1)
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

    peak = measure.peak_memory_bytes(step, torch.device("cpu"))
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
    vae = ref.build_reference_vae(dict(harness.TINY_ARCHITECTURE,
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


def test_gan_flag_times_both_sides_past_disc_start(monkeypatch, capsys):
    """--gan: ours runs with the discriminator on (its logs carry g_loss and d_loss) and the reference's GAN step is
    what is timed; without --gan the plain reference step is timed and ours has no discriminator."""
    import reference as ref
    from kl_autoencoder import trainer

    calls, ours_logs = [], []

    def recording(name, real):
        def call(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return call

    for name in ("reference_training_step", "reference_gan_training_step"):
        monkeypatch.setattr(ref, name, recording(name, getattr(ref, name)))
    real_step = trainer.train_step

    def ours_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        ours_logs.append(set(result.logs))
        return result

    monkeypatch.setattr(trainer, "train_step", ours_step)
    result = bench.main(["--tiny", "--repeats", "1", "--only", "train", "--no-memory", "--gan"])
    row = {r["name"]: r for r in result["rows"]}["train step"]
    assert row["ours"] > 0 and row["reference"] > 0
    assert "GAN on both sides" in capsys.readouterr().out
    assert calls and set(calls) == {"reference_gan_training_step"}  # warm-up, timed round, FLOP count
    assert ours_logs and all({"g_loss", "d_weight", "d_loss"} <= logs for logs in ours_logs)
    calls.clear()
    ours_logs.clear()
    bench.main(["--tiny", "--repeats", "1", "--only", "train", "--no-memory"])
    assert calls and set(calls) == {"reference_training_step"}
    assert ours_logs and not any("g_loss" in logs or "d_loss" in logs for logs in ours_logs)


def test_reference_gan_step_adds_the_adaptive_adversarial_term_and_trains_the_discriminator():
    """Checked against the same step written out independently: the loss is the plain step's plus
    disc_weight * (||d rec / dW|| / (||d g / dW|| + 1e-4)) * g, W the decoder's last conv; the VAE moves by that
    loss's gradient, the discriminator by its hinge loss's gradient alone (nothing leaks from the generator's pass)."""
    import copy

    import reference as ref
    from kl_autoencoder.losses import PatchDiscriminator

    torch.manual_seed(0)
    vae = ref.build_reference_vae(ref.with_block_types(harness.TINY_ARCHITECTURE))
    disc = PatchDiscriminator(3, 8, 3, "group")
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def lpips_model(a, b):
        return (a - b).abs().mean(dim=(1, 2, 3))

    vae_plain, vae_check, disc_check, disc_before = (copy.deepcopy(m) for m in (vae, vae, disc, disc))
    plain = ref.reference_training_step(vae_plain, lpips_model, torch.optim.SGD(vae_plain.parameters(), lr=0.1), x,
                                        generator=torch.Generator().manual_seed(0))
    loss = ref.reference_gan_training_step(vae, lpips_model, torch.optim.SGD(vae.parameters(), lr=0.1), disc,
                                           torch.optim.SGD(disc.parameters(), lr=0.1), x, disc_weight=0.5,
                                           generator=torch.Generator().manual_seed(0))
    # The same step by hand, with .backward() and .grad for the gradient norms.
    posterior = vae_check.encode(x).latent_dist
    reconstruction = vae_check.decode(posterior.sample(generator=torch.Generator().manual_seed(0))).sample
    rec = (reconstruction - x).abs().mean() + lpips_model(reconstruction, x).mean()
    g = -copy.deepcopy(disc_check)(reconstruction).mean()  # a copy: disc_check's .grad stays the hinge loss's
    norms = []
    for term in (rec, g):
        vae_check.zero_grad()
        term.backward(retain_graph=True)
        norms.append(vae_check.decoder.conv_out.weight.grad.norm())
    adversarial = 0.5 * (norms[0] / (norms[1] + 1e-4)).detach() * g
    assert abs(adversarial.item()) > 1e-3
    torch.testing.assert_close(loss - plain, adversarial.detach(), rtol=1e-4, atol=1e-6)
    vae_check.zero_grad()
    (rec + 1e-6 * posterior.kl().mean() + adversarial).backward()
    with torch.no_grad():
        for p in vae_check.parameters():
            p -= 0.1 * p.grad
    for got, want in zip(vae.parameters(), vae_check.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    hinge = 0.5 * (torch.relu(1 - disc_check(x)).mean() + torch.relu(1 + disc_check(reconstruction.detach())).mean())
    hinge.backward()
    with torch.no_grad():
        for got, want in zip(disc.parameters(), disc_check.parameters()):
            torch.testing.assert_close(got, want - 0.1 * want.grad, rtol=1e-4, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(disc.parameters(), disc_before.parameters()))  # it moved


def test_interleaved_times_repeat_short_calls_to_min_seconds():
    calls = {"ours": 0, "reference": 0}

    def call(name):
        def fn():
            calls[name] += 1
            time.sleep(0.002)
        return fn

    times = measure.interleaved_times({k: call(k) for k in calls}, repeats=2, device=torch.device("cpu"), warmup=1,
                                    min_seconds=0.02)
    assert calls["ours"] == calls["reference"] >= 1 + 2 * 5  # the same number of calls per sample for both
    assert all(0.002 <= t < 0.02 for ts in times.values() for t in ts)  # seconds per call, not per sample


def test_gpu_session_script_parses_and_its_run_arguments_are_valid():
    """benchmarks/gpu_session.sh is run once on a lent GPU: a syntax error or a stale option would waste the lease."""
    import subprocess

    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    script, wheels = benchmarks / "gpu_session.sh", benchmarks / "gpu_wheels.sh"
    for path in (script, wheels):
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, path
    text = script.read_text()
    fetched = re.search(r'WHEELS="(.*?)"', wheels.read_text()).group(1)
    for needed in ("diffusers", "lpips", "datasets"):  # what the session imports and the device image lacks
        assert f"{needed}==" in fetched and needed in text
    commands = re.findall(r"benchmarks/run\.py (.*?)--json", text.replace("\\\n", " "), flags=re.S)
    assert len(commands) == 2
    for command in commands:
        argv = [a.strip('"') for a in command.split()]
        bench.parse_args(["cpu" if a == "$DEV" else "2" if a.startswith("$") else a for a in argv])


# ---------------------------------------------------------------------------------------------- the shared harness


def test_header_names_the_time_the_machine_and_the_command_that_reproduces_it():
    text = harness.header("tiny.py", ["--repeats", "1"], torch.device("cpu"))
    first, second = text.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC \| .+, \d+ cores, \d+ threads(, load average [\d./]+)?; "
                        r"torch \S+", first), first
    assert second == "command: python benchmarks/tiny.py --repeats 1"


def test_tables_print_ratios_from_the_numbers_shown():
    assert harness.printed_ratio(12.3456, 9.87654) == 12.3 / 9.88 and harness.printed_ratio(1.0, None) is None
    assert harness.printed_ratio(1.0, 0.0001) == 1.0 / 0.0001 and harness.printed_ratio(1.0, 0.0) is None
    assert harness.rate_table("path", [("a", 12.345)]).splitlines() == ["| path | images/s |", "|---|---|",
                                                                       "| a | 12.3 |"]


def test_result_files_are_written_whole_and_read_back(tmp_path):
    harness.write_json(tmp_path / "r.json", {"rows": [1.5]}, indent=1)
    assert json.loads((tmp_path / "r.json").read_text()) == {"rows": [1.5]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left beside it
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n\n{"step": 2}\n')
    assert harness.read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}]
    assert harness.read_jsonl(tmp_path / "missing.jsonl") == []


def test_a_child_measurement_is_its_last_line_and_a_failure_stops_with_its_error():
    import pytest

    printed = "print('loading...'); print('{\"peak_mib\": 3.5}')"
    assert measure.run_child([sys.executable, "-c", printed], "child") == {"peak_mib": 3.5}
    with pytest.raises(SystemExit, match=r"(?s)1024 ours failed:.*ValueError: out of memory"):
        measure.run_child([sys.executable, "-c", "raise ValueError('out of memory')"], "1024 ours")


def test_images_per_second_counts_the_timed_batches_only():
    drawn = []

    def stream():
        while True:
            drawn.append(1)
            time.sleep(0.01)
            yield {"pixel_values": torch.zeros(40, 3, 2, 2)}

    batches = stream()
    next(batches)  # e.g. worker start-up: not timed
    rate = measure.images_per_second(batches, 3)  # images, not batches: 3 x 40 over at least 3 x 10 ms
    assert len(drawn) == 4 and 40 * 3 / (3 * 0.01 + 0.5) < rate <= 40 * 3 / (3 * 0.01)


def test_checked_device_stops_clearly_without_cuda(monkeypatch):
    import pytest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is available"):
        harness.checked_device("cuda")
    assert harness.checked_device("cpu") == torch.device("cpu")


def documented_benchmark_lines() -> list[tuple[str, str, str]]:
    """(document, script, arguments) of every `python benchmarks/SCRIPT.py ...` line of the documents, except
    synopses with [optional] parts."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for path in [root / "BENCHMARKS.md", root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for script, args in re.findall(r"python benchmarks/(\w+)\.py([^`\n]*)", path.read_text(encoding="utf-8")):
            if "[" not in args:
                found.append((path.name, script, args.split("  #")[0].strip()))
    return found


def test_every_documented_benchmark_line_parses_with_its_script():
    """The commands that give BENCHMARKS.md's figures keep working with the same flags: each parses with its script's
    own `parse_args` (a placeholder such as VAL or PATH... stands for a folder)."""
    import importlib
    import shlex

    lines = documented_benchmark_lines()
    assert len({script for _, script, _ in lines}) >= 15
    for where, script, args in lines:
        try:
            importlib.import_module(script).parse_args(shlex.split(args))
        except SystemExit as stop:
            raise AssertionError(f"{where}: python benchmarks/{script}.py {args} does not parse ({stop})") from None


def test_model_section_times_the_model_as_loaded_and_with_the_lean_pair(capsys):
    result = bench.main(["--tiny", "--repeats", "1", "--only", "model"])
    table = parse_table(capsys.readouterr().out)
    for name in ("model step as loaded", "model step, lean pair on"):
        unit, ours, reference, ratio = table[name]
        assert unit == "images/s" and float(ours) > 0 and float(reference) > 0
    assert sorted(result["seconds"]["model_step_seconds"]) == ["ours", "ours_lean", "reference"]
