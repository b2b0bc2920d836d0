"""A run's per-step figures: metrics.jsonl (one JSON object a line, flushed as the run goes, so a crash
loses nothing written), TensorBoard event files when the tensorboard package is installed (the numbers as
scalars, a PPO step's sample rollouts as text), and a PNG plot of the curves at the end. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

from hybrid_engine.rlhf.distributed import is_main_rank

PLOTTED = (("score", "reward (training score)"), ("rule", "rule score (held out)"),
           ("kl", "KL to reference (nats per response)"),
           ("policy_loss", "policy loss"), ("value_loss", "value loss"))
"""The curves of the plot: (record key, title)."""


class MetricsLog:
    """Writes step records under `directory`: metrics.jsonl and tensorboard/ (rank 0 only)."""

    def __init__(self, directory: str | os.PathLike, tag: str, resume_step: int | None = None):
        """resume_step: a run resumed from the checkpoint of that step; the records a killed run wrote after it
        are dropped (the resumed run writes them again). None: a new run, which starts a new file. Nothing is
        created until the first record (a run that fails its checks leaves no files)."""
        self.tag = tag
        self.enabled = is_main_rank()
        self.directory = Path(directory)
        self.resume_step = resume_step
        self._file = self._writer = None

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "metrics.jsonl"
        step = self.resume_step
        kept = [r for r in read_metrics(path) if r["step"] <= step] if step and path.is_file() else []
        self._file = open(path, "w", encoding="utf-8")
        for record in kept:
            self._file.write(json.dumps(record) + "\n")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional: the JSONL and the plot still hold everything
            return
        purge = None if step is None else step + 1  # drops the killed run's later events
        self._writer = SummaryWriter(str(self.directory / "tensorboard"), purge_step=purge)

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        self._file.write(json.dumps({"tag": self.tag, "step": step, **record}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(f"{self.tag}/{key}", value, step)
                elif key == "samples" and value:
                    self._writer.add_text(f"{self.tag}/samples", samples_text(value), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()


def samples_text(samples: list[dict]) -> str:
    """A step's sample rollouts ({prompt, completion, score} each) as TensorBoard markdown: the texts verbatim,
    as indented code blocks (a conversational prompt one 'role: content' line a message)."""
    def block(text: str | list[dict]) -> str:
        if isinstance(text, list):  # a conversational prompt: its messages
            text = "\n".join(f"{m['role']}: {m['content']}" for m in text)
        return textwrap.indent(text or "(empty)", "    ", lambda line: True)

    return "\n\n".join(f"**{i}.** score {s['score']:.4g}, prompt:\n\n{block(s['prompt'])}\n\ncompletion:\n\n"
                       f"{block(s['completion'])}" for i, s in enumerate(samples, 1))


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
