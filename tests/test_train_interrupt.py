"""`sd train` stopped by SIGINT (Ctrl-C) at several moments, in a real process: the output folder holds only whole
files (every .safetensors opens and reads to the end, every .png decodes, no temporary file is left), and a stage
that was interrupted has saved its last completed step where the message says. An interrupt is never reported as
an error.

The signal is sent when the process's output shows the moment (tqdm's bar on stderr, the stage lines on stdout),
so the test does not depend on how fast the machine is; each run uses tiny models on 16 px images.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from reference import tiny_configs

STEPS = 30  # per stage: a signal sent on seeing step 3 lands with most of the stage still to go
SAVED = re.compile(r"sd train: interrupted; (VAE|diffusion) step (\d+) of (\d+) is saved in (\S+?\.safetensors);")
# The moment to interrupt at: a pattern in the output (None: none, right after the start) and how many steps of
# the stage it must show done, if any.
MOMENTS = {
    "starting": (None, 0),
    "vae stage": (r"vae: +\d+%\|[^|]*\| *(\d+)/", 3),
    "between the stages": (r"VAE trained", 0),
    "diffusion stage": (r"diffusion: +\d+%\|[^|]*\| *(\d+)/", 9),
    "end": (r"diffusion: +100%", 0),
}
START_DELAY_S = 0.5  # "starting": Python is importing torch or building the models
TIMEOUT_S = 120  # a cap for a loaded machine; a run takes about 8 s


class Output:
    """Everything the process writes (stdout and stderr together), read as it comes by a thread."""

    def __init__(self, proc: subprocess.Popen):
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        while chunk := os.read(stream.fileno(), 4096):
            self.chunks.append(chunk)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")

    def steps_shown(self, pattern: str) -> int | None:
        """None until the pattern shows; then the largest step count it captured (0 if it captures none)."""
        found = [int(m.group(1)) if m.re.groups else 0 for m in re.finditer(pattern, self.text().replace("\r", "\n"))]
        return max(found) if found else None


def wait_for(output: Output, proc: subprocess.Popen, pattern: str | None, steps: int) -> int:
    """Wait until the moment shows (or the process ends); returns the steps it showed done."""
    if pattern is None:
        time.sleep(START_DELAY_S)
        return 0
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        shown = output.steps_shown(pattern)
        if shown is not None and shown >= steps:
            return shown
        time.sleep(0.01)
    pytest.fail(f"the process never showed {pattern!r} (at least {steps} steps):\n{output.text()}")


def check_only_whole_files(out: Path) -> None:
    for path in out.rglob("*"):
        assert not (path.name.startswith(".") and path.name.endswith(".tmp")), f"temporary file left: {path}"
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
                if path.stem.startswith("checkpoint-"):
                    assert f.metadata()["step"] == path.stem.split("-")[1], path
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()


def check_the_last_step_is_saved(said: str, shown: int) -> None:
    """An interrupted stage names the checkpoint of its last completed step: it is there, at that step, at least
    as far as the progress bar had shown."""
    stage, step, steps, path = SAVED.search(said).groups()
    with safe_open(path, "pt") as f:
        assert f.metadata()["step"] == step
    assert shown <= int(step) <= int(steps) == STEPS, said


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "configs.json"
    path.write_text(json.dumps({name: cfg.__dict__ for name, cfg in tiny_configs().items()}))
    return path


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigint_leaves_only_whole_files_and_saves_the_last_step(tmp_path, config_file, moment):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "sd", "train", "--out", str(out), "--steps", str(STEPS),
               "--vae-steps", str(STEPS), "--batch-size", "2", "--size", "16", "--config", str(config_file),
               "--device", "cpu", "--checkpoint-every", "7", "--sample-every", "10"]
    # One torch thread: on a loaded machine, two spinning threads make a run many times slower.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    output = Output(proc)
    try:
        shown = wait_for(output, proc, *MOMENTS[moment])
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    output.thread.join(timeout=5)
    said = output.text()
    # `sd` exits 130 on Ctrl-C. Python itself dies of the signal (-2), with its traceback, if it comes while sd is
    # being imported, before sd's handler is in place (one that comes while numpy and torch load waits for them:
    # inside them it could abort the process or break numpy's import); or, in "end", after the run is written.
    before_sd = moment == "starting" and code == -signal.SIGINT
    assert code == 130 or before_sd or f"wrote {out / 'model.safetensors'}" in said, said
    assert "sd: error" not in said and (code != 130 or "Traceback" not in said), said
    if out.exists():
        check_only_whole_files(out)
    if moment in ("vae stage", "diffusion stage"):
        assert code != 0, said
        check_the_last_step_is_saved(said, shown)
