"""training/train.py with a pause inside the VAL_PAUSE_AT-th validation pass (after its figures are measured, before
they are logged or a best checkpoint is written), so a test can SIGKILL the run in the middle of validation.
Arguments are train.py's."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kl_autoencoder import validation  # noqa: E402
from tests.slow_checkpoint_train import run_train_py  # noqa: E402

PAUSE_MARK = "PAUSING-IN-VALIDATION"
PAUSE_SECONDS = 120


def main() -> None:
    measure = validation.Validation.measure
    calls = {"n": 0}

    def slow_measure(self):
        result = measure(self)
        calls["n"] += 1
        if calls["n"] == int(os.environ["VAL_PAUSE_AT"]):
            print(PAUSE_MARK, flush=True)
            time.sleep(PAUSE_SECONDS)
        return result

    validation.Validation.measure = slow_measure
    run_train_py(sys.argv[1:])


if __name__ == "__main__":
    main()
