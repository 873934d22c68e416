"""Attacks that would block or wedge a run: FIFOs where the toolkit reads, signals while blocked, damaged or dangling
shards left in an encode folder.

Anything that could block runs in a process of its own, under a timeout: a read blocked on a FIFO inside
safetensors or pyarrow holds the GIL, no thread could time it out.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kl_autoencoder.durable import NotRegularFileError, check_regular_file
from tests.test_output_safety import _one_error_line, images  # noqa: F401 (fixture)
from tests.test_reliability import ENV, ROOT

BLOCKED = 120  # seconds: a call that takes longer is blocked (each finishes in a few seconds when it is not)


def _cli(*args: str, timeout: float = BLOCKED) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "kl_autoencoder.cli", *args], capture_output=True, text=True,
                              cwd=ROOT, env=ENV, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kl-autoencoder {args[0]} blocked (on a FIFO?) for {timeout} s")


@pytest.fixture
def encoded(tmp_path, tiny_model, images):
    """(model folder, a finished sharded encode of `images`)."""
    model = tiny_model.save_pretrained(tmp_path / "vae")
    out = tmp_path / "lat"
    result = _cli("encode", "--model", str(model), "--input", str(images), "--out", str(out), "--resolution", "32",
                  "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return model, out


def test_the_regular_file_check_names_what_it_found(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(NotRegularFileError, match=r"shard .*pipe is a FIFO, not a regular file"):
        check_regular_file(tmp_path / "pipe", "shard")
    with pytest.raises(NotRegularFileError, match="is a device"):
        check_regular_file("/dev/zero")
    check_regular_file(tmp_path / "missing")  # a missing file is the caller's to report


def test_loading_latent_shards_refuses_a_fifo_shard(encoded):
    _, out = encoded
    shard = next(out.glob("latent-shard-*.safetensors"))
    shard.unlink()
    os.mkfifo(shard)
    code = ("from kl_autoencoder.latent_shards import load_latent_shards\n"
            f"load_latent_shards({str(out)!r})")
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV,
                                timeout=BLOCKED)
    except subprocess.TimeoutExpired:
        pytest.fail("load_latent_shards blocked on a FIFO shard")
    assert result.returncode != 0 and "is a FIFO, not a regular file" in result.stderr


@pytest.mark.parametrize("planted", ["fifo", "damaged", "dangling"])
def test_an_encode_rerun_names_a_bad_shard_and_overwrite_clears_it(encoded, images, tmp_path, planted):
    model, out = encoded
    shard = next(out.glob("latent-shard-*.safetensors"))
    shard.unlink()
    if planted == "fifo":
        os.mkfifo(shard)
    elif planted == "damaged":
        shard.write_bytes(b"\x00" * 40)
    else:
        shard.symlink_to(tmp_path / "gone.safetensors")
    (tmp_path / "user-notes.txt").write_text("mine")
    argv = ["encode", "--model", str(model), "--input", str(images), "--out", str(out), "--resolution", "32",
            "--device", "cpu"]
    rerun = _cli(*argv)
    line = _one_error_line(rerun.stderr)
    assert rerun.returncode == 2 and shard.name in line and "--overwrite" in line
    replaced = _cli(*argv, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert shard.is_file() and not shard.is_symlink() and (tmp_path / "user-notes.txt").read_text() == "mine"


def _saved_dataset(tmp_path: Path) -> Path:
    import datasets
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    features = datasets.Features({"image": datasets.Image()})
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [{"bytes": buffer.getvalue(), "path": None}]},
                               features=features).save_to_disk(str(saved))
    return saved


def test_encoding_a_saved_dataset_with_a_fifo_arrow_file_is_refused(tmp_path, tiny_model):
    saved = _saved_dataset(tmp_path)
    arrow = next(saved.glob("*.arrow"))
    arrow.unlink()
    os.mkfifo(arrow)
    model = tiny_model.save_pretrained(tmp_path / "vae")
    result = _cli("encode", "--model", str(model), "--input", str(saved), "--out", str(tmp_path / "lat"),
                  "--resolution", "32", "--device", "cpu")
    line = _one_error_line(result.stderr)
    assert result.returncode == 2 and arrow.name in line and "FIFO" in line


BLOCKED_ENCODE = """
import sys
import kl_autoencoder.latent_shards as shards
import kl_autoencoder.signals as signals
signals.GRACE_SECONDS = 2
shards.check_regular_file = lambda *args, **kwargs: None  # the FIFO guards taken away: safetensors' open blocks
shards._damage = lambda path: None
from kl_autoencoder.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_until_blocked_on_a_fifo(process: subprocess.Popen) -> None:
    deadline = time.monotonic() + BLOCKED
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        tasks = list(Path(f"/proc/{process.pid}/task").glob("*/wchan"))
        if not tasks:
            pytest.skip("no /proc/PID/task/*/wchan to see where the process waits")
        for task in tasks:  # any thread: Linux's wait_for_partner / fifo_open is inside open() of a FIFO
            try:
                wchan = task.read_text()
            except OSError:
                continue
            if "partner" in wchan or "fifo" in wchan:
                return
        time.sleep(0.2)
    pytest.fail("the encode never reached the FIFO")


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_command_blocked_inside_a_library_still_stops_on_a_signal(encoded, images, signum, status):
    """safetensors retries an interrupted open() of the FIFO holding the interpreter lock, so no Python handler (nor
    thread) can run: the signal watcher stops the process with the signal's usual status."""
    model, out = encoded
    shard = next(out.glob("latent-shard-*.safetensors"))
    shard.unlink()
    os.mkfifo(shard)
    process = subprocess.Popen([sys.executable, "-c", BLOCKED_ENCODE, "encode", "--model", str(model), "--input",
                                str(images), "--out", str(out), "--resolution", "32", "--device", "cpu"],
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    try:
        _wait_until_blocked_on_a_fifo(process)
        process.send_signal(signum)
        try:
            _, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{signal.Signals(signum).name} did not stop a command blocked on a FIFO")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    # ended by the signal's default action: the shell's 128 + number, -number to Popen
    assert process.returncode in (status, -signum) and "while blocked" in err


STUCK_LOOP = """
import sys, time
from kl_autoencoder.trainer import stop_signals
with stop_signals() as stop:
    print("ready", flush=True)
    while True:  # a training step that never ends (a stalled data source): the flag is never looked at
        time.sleep(0.05)
"""


def test_a_second_signal_stops_a_stuck_training_loop_at_once():
    process = subprocess.Popen([sys.executable, "-c", STUCK_LOOP], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env=ENV)
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)  # the loop's handler: finish the step, checkpoint, stop
        time.sleep(1)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("a second SIGTERM did not stop a training loop stuck in its step")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode in (143, -signal.SIGTERM)
