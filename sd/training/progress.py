"""What a training run shows as it goes: a CSV log of every step and, at the end, a picture of the loss curve.

No tutorial counterpart. The progress bar (tqdm, in sd.training.train) shows the loss, the learning rate and the
steps per second; this file keeps them. `log.csv` holds one row per step done; a resumed run keeps the rows up to
its checkpoint and goes on from there, so the log of a run that was interrupted and resumed reads as one run.
`loss.png` plots the loss per step (grey) and its moving average (blue), drawn with Pillow.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from PIL import Image, ImageDraw

from ..files import atomic_output

LOG_FILE = "log.csv"
LOSS_PLOT = "loss.png"
COLUMNS = ("step", "loss", "lr", "seconds")  # seconds: since this process started training
PLOT_SIZE = (720, 400)
PLOT_MARGIN = 48  # pixels around the axes, for their labels
SMOOTHING = 20  # the moving average spans 1/SMOOTHING of the run (at least one step)


class TrainingLog:
    """log.csv in out_dir: the rows up to step `done` kept (a resumed run), each step after it appended. Nothing is
    written before the first step is added, so a run that stops before it leaves no log."""

    def __init__(self, out_dir: str | os.PathLike, done: int):
        self.path = Path(out_dir) / LOG_FILE
        self.rows = [row for row in read_log(self.path) if row["step"] <= done]
        self._file = self._writer = None

    def add(self, step: int, loss: float, lr: float, seconds: float) -> None:
        if self._file is None:
            self._start()
        row = {"step": step, "loss": loss, "lr": lr, "seconds": round(seconds, 3)}
        self.rows.append(row)
        self._writer.writerow(row)
        self._file.flush()

    def _start(self) -> None:
        """The kept rows written whole, then the file open for appending."""
        with atomic_output(self.path, overwrite=True) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, COLUMNS)
                writer.writeheader()
                writer.writerows(self.rows)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, COLUMNS)

    def close(self) -> None:
        """Close the file; at most the step being appended when a crash came is lost."""
        if self._file is not None:
            self._file.close()


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a log.csv ({} for a missing file); a last line cut short by a crash is left out."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            rows.append({"step": int(row["step"]), "loss": float(row["loss"]), "lr": float(row["lr"]),
                         "seconds": float(row["seconds"])})
        except (KeyError, TypeError, ValueError):
            break
    return rows


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_losses(rows: list[dict], path: str | os.PathLike) -> Path:
    """A PNG of the loss against the step: each step in grey, the moving average in blue, the range labelled."""
    image = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = PLOT_MARGIN, PLOT_MARGIN // 2, PLOT_SIZE[0] - PLOT_MARGIN // 2, PLOT_SIZE[1] - PLOT_MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    if rows:
        steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
        low, high = min(losses), max(losses)
        span_x, span_y = max(steps[-1] - steps[0], 1), (high - low) or 1.0

        def point(step, loss):
            return (left + (right - left) * (step - steps[0]) / span_x, bottom - (bottom - top) * (loss - low) / span_y)

        smooth = moving_average(losses, max(1, len(losses) // SMOOTHING))
        for values, colour in ((losses, (170, 170, 170)), (smooth, (30, 60, 220))):
            points = [point(s, v) for s, v in zip(steps, values)]
            draw.line(points if len(points) > 1 else points * 2, fill=colour, width=2)
        draw.text((4, top), f"{high:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{low:.4g}", fill="black")
        draw.text((left, bottom + 6), f"step {steps[0]}", fill="black")
        draw.text((right - 80, bottom + 6), f"step {steps[-1]}", fill="black")
    draw.text((left + 8, top + 6), "loss per step (grey), moving average (blue)", fill="black")
    with atomic_output(Path(path), overwrite=True) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
