"""A run's per-step figures: metrics.jsonl (one JSON object a line, flushed as the run goes, so a crash loses nothing
written), the trackers --report-to names (trackers.py; by default TensorBoard event files when the tensorboard
package is installed: the numbers as scalars, a PPO step's sample rollouts as text), and a PNG plot of the curves at
the end. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from hybrid_engine.commands.trackers import Reporting, close_sinks, is_number, open_sinks
from hybrid_engine.rlhf.distributed import is_main_rank

PLOTTED = (("score", "reward (training score)"), ("rule", "rule score (held out)"),
           ("kl", "KL to reference (nats per response)"),
           ("policy_loss", "policy loss"), ("value_loss", "value loss"))
"""The curves of the plot: (record key, title)."""


class MetricsLog:
    """Writes step records under `directory`: metrics.jsonl and the trackers' records (rank 0 only). Used as a
    context manager, or closed by close(): the trackers' runs are ended as failed when the block raised."""

    def __init__(self, directory: str | os.PathLike, tag: str, resume_step: int | None = None,
                 report: Reporting | None = None, config: Mapping | None = None):
        """resume_step: a run resumed from the checkpoint of that step; the records a killed run wrote after it
        are dropped (the resumed run writes them again). None: a new run, which starts a new file. report: the
        trackers (default: TensorBoard when installed); config: the step's settings (step_config.config_dict),
        given to each tracker once. Nothing is created until the first record (a run that fails its checks leaves
        no files)."""
        self.tag = tag
        self.enabled = is_main_rank()
        self.directory = Path(directory)
        self.resume_step = resume_step
        self.report, self.config = report or Reporting(), config
        self._file, self._sinks = None, None

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "metrics.jsonl"
        step = self.resume_step
        kept = [r for r in read_metrics(path) if r["step"] <= step] if step and path.is_file() else []
        self._file = open(path, "w", encoding="utf-8")
        for record in kept:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        self._file.write(json.dumps({"tag": self.tag, "step": step, **record}) + "\n")
        self._file.flush()  # before the trackers: what they fail on is kept here
        if self._sinks is None:  # opened at the first record, after it is safe in the file
            self._sinks = open_sinks(self.report, self.directory, self.tag, self.resume_step, self.config)
        scalars = {f"{self.tag}/{key}": value for key, value in record.items() if is_number(value) and key != "step"}
        samples = record.get("samples") or None
        for sink in self._sinks:
            sink.log(step, scalars, samples)

    def close(self, failed: bool = False) -> None:
        if self._file is not None:
            self._file.close()
        sinks, self._sinks = self._sinks or [], []
        close_sinks(sinks, failed)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


def log_losses(directory: str | os.PathLike, tag: str, result, report: Reporting | None = None,
               config: Mapping | None = None) -> None:
    """An SFT or reward run's metrics.jsonl (and trackers), written when the step has finished: each step's loss and
    learning rate."""
    with MetricsLog(directory, tag, report=report, config=config) as log:
        for i, (loss, lr) in enumerate(zip(result.losses, result.lrs, strict=True)):
            log.write(i + 1, {"loss": loss, "lr": lr})


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(records: list[dict], path: str | os.PathLike, title: str) -> bool:
    """A PNG of every PLOTTED curve the records hold, one panel each, against the step; False (and no file)
    when matplotlib is missing or no record holds a plotted key."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(key, name) for key, name in PLOTTED if any(key in r for r in records)]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (key, name) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("PPO step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
