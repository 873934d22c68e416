"""training/train.py with a pause after a checkpoint's temporary folder is complete and before it is renamed into
place, so a test can SIGKILL the run in the middle of a checkpoint write. Arguments are train.py's."""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kl_autoencoder import checkpoints  # noqa: E402

PAUSE_MARK = "PAUSING-BEFORE-RENAME"
PAUSE_SECONDS = 120


def main() -> None:
    publish = checkpoints.publish

    def slow_publish(tmp: Path, final: Path) -> None:
        print(f"{PAUSE_MARK} {tmp}", flush=True)
        time.sleep(PAUSE_SECONDS)
        publish(tmp, final)

    checkpoints.publish = slow_publish
    run_train_py(sys.argv[1:])


def run_train_py(args: list[str]) -> None:
    """training/train.py with `args`, in this process (after a wrapper has patched what it slows down)."""
    train_py = str(ROOT / "training" / "train.py")
    sys.argv = [train_py, *args]
    runpy.run_path(train_py, run_name="__main__")


if __name__ == "__main__":
    main()
