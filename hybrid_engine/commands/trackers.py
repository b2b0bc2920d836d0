"""--report-to: the experiment trackers a training command reports its per-step figures to, beside metrics.jsonl and
the PNG, which are always written. Only rank 0 reports.

    --report-to tensorboard       the default: TensorBoard, when the tensorboard package is installed
    --report-to wandb mlflow      several (also comma-separated: wandb,mlflow)
    --report-to all               every installed tracker of NAMES (TRL's word); `none`: no tracker

TensorBoard is our own SummaryWriter in <folder>/tensorboard/ (the numbers as scalars under '<tag>/<key>', a PPO
step's samples as text, a resumed run's events after its checkpoint purged); wandb, mlflow and trackio go through
accelerate.tracking's tracker classes (a new tracker run each time a command runs, a resumed one included). Each
tracker reads its own environment (WANDB_MODE, WANDB_PROJECT, WANDB_DIR, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME,
...); where it says nothing, wandb writes under the command's output folder (<output>/wandb/, project
'hybrid-engine') and mlflow keeps a file store there (file:<output>/mlruns, experiment 'hybrid-engine'), which
mlflow-skinny can write (a sqlite store needs the full mlflow) and which travels with the run's model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.state import PartialState
from accelerate.tracking import GeneralTracker, MLflowTracker, TrackioTracker, WandBTracker
from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_trackio_available, is_wandb_available

NAMES = ("tensorboard", "wandb", "mlflow", "trackio")
"""The trackers --report-to takes, besides `all` and `none`."""
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}
"""What to pip install for each."""
AVAILABLE: dict[str, Callable[[], bool]] = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                                            "mlflow": is_mlflow_available, "trackio": is_trackio_available}
"""Whether each tracker's package is installed (accelerate's checks, which import nothing)."""
PROJECT = "hybrid-engine"
"""The wandb and trackio project and the mlflow experiment, where the environment names none."""


def installed(name: str) -> bool:
    return AVAILABLE[name]()


def parse_names(given: Sequence[str] | None, flag: str = "--report-to") -> tuple[str, ...]:
    """The trackers `given` names (each value may hold several, comma-separated), in NAMES' order: `all` adds every
    installed one, `none` stands alone for none; None (not given): TensorBoard when it is installed. A name of no
    tracker, and a named tracker whose package is missing, are refused in one line."""
    if given is None:
        return ("tensorboard",) if installed("tensorboard") else ()
    words = [w.strip().lower() for value in given for w in str(value).split(",") if w.strip()]
    shown = f"{flag} {' '.join(map(str, given))}"
    bad = [w for w in words if w not in (*NAMES, "all", "none")]
    if bad or not words:
        what = f"{bad[0]!r} is not a tracker" if bad else "no tracker named"
        raise ValueError(f"{shown}: {what}; accepted: {', '.join(NAMES)}, all (every installed one), none "
                         "(several: wandb mlflow, or wandb,mlflow)")
    if "none" in words:
        if set(words) != {"none"}:
            raise ValueError(f"{shown}: 'none' reports to no tracker; it cannot stand beside another name")
        return ()
    for name in words:
        if name in NAMES and not installed(name):
            raise ValueError(f"{flag} {name}: the {name} package is not installed (pip install {PACKAGES[name]})")
    return tuple(n for n in NAMES if n in words or ("all" in words and installed(n)))


@dataclass(frozen=True)
class Reporting:
    """Where a run's figures go besides metrics.jsonl."""

    to: tuple[str, ...] = field(default_factory=lambda: parse_names(None))
    """The trackers, checked by parse_names."""
    run_name: str = ""
    """The tracker run's name; '': the metrics folder's name."""
    root: str | None = None
    """Where wandb/ and mlruns/ go when the environment does not say: the command's output folder (None: the metrics
    folder)."""

    def for_step(self, step: str) -> Reporting:
        """The reporting of one step of `train`: its tracker run named '<run name>-<step>'."""
        return dataclasses.replace(self, run_name=f"{self.run_name}-{step}" if self.run_name else step)


def add_report_args(parser) -> None:
    """--report-to and --run-name on `parser` (a parser or an argument group); also spelt as TRL's --report_to and
    --run_name."""
    parser.add_argument("--report-to", "--report_to", nargs="+", action="extend", metavar="NAME",
                        help=f"the trackers the per-step figures also go to: {', '.join(NAMES)} (several, or "
                        "comma-separated), all (every installed one) or none; metrics.jsonl (and PPO's plot) is "
                        "written whatever this says. Each reads its own environment (WANDB_MODE, "
                        "MLFLOW_TRACKING_URI, ...); otherwise wandb writes under --output and mlflow a file store in "
                        "--output/mlruns. Default: tensorboard, when installed (also report_to in --config)")
    parser.add_argument("--run-name", "--run_name", metavar="NAME", help="the tracker run's name (default: the "
                        "--output folder's name; train's steps add -sft, -reward, -ppo); also run_name in --config")


def reporting(args: argparse.Namespace, output: str) -> Reporting:
    """The run's Reporting from --report-to and --run-name (or their config file keys), checked before any work."""
    name = args.run_name or Path(output).resolve().name
    return Reporting(to=parse_names(args.report_to), run_name=name, root=output)


# -- the trackers -------------------------------------------------------------------------------------------------


def is_number(value) -> bool:
    """A figure the trackers take as a scalar: a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flat_config(values: Mapping, prefix: str = "") -> dict:
    """A step's config (step_config.config_dict) as one level of JSON-safe values, nested keys joined by '.'."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def prompt_text(prompt: str | list[dict]) -> str:
    """A sample's prompt as text: a conversational one as one 'role: content' line a message."""
    if isinstance(prompt, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return prompt


def samples_text(samples: list[dict]) -> str:
    """A step's sample rollouts ({prompt, completion, score} each) as TensorBoard markdown: the texts verbatim,
    as indented code blocks (a conversational prompt one 'role: content' line a message)."""
    def block(text: str | list[dict]) -> str:
        return textwrap.indent(prompt_text(text) or "(empty)", "    ", lambda line: True)

    return "\n\n".join(f"**{i}.** score {s['score']:.4g}, prompt:\n\n{block(s['prompt'])}\n\ncompletion:\n\n"
                       f"{block(s['completion'])}" for i, s in enumerate(samples, 1))


class TensorBoardSink:
    """TensorBoard events in <folder>/tensorboard (our SummaryWriter: purge_step drops a killed run's later events)."""

    def __init__(self, folder: Path, tag: str, resume_step: int | None, config: Mapping | None):
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

        purge = None if resume_step is None else resume_step + 1
        self.writer, self.tag = SummaryWriter(str(folder / "tensorboard"), purge_step=purge), tag
        if config and resume_step is None:
            self.writer.add_text(f"{tag}/config", "    " + json.dumps(config, indent=1).replace("\n", "\n    "), 0)

    def log(self, step: int, scalars: dict, samples: list[dict] | None) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        if samples:
            self.writer.add_text(f"{self.tag}/samples", samples_text(samples), step)

    def close(self, failed: bool) -> None:
        self.writer.close()


def _wandb(run_name: str, root: Path) -> GeneralTracker:
    where = {} if os.environ.get("WANDB_DIR") else {"dir": str(root)}
    return WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, **where)


def _mlflow(run_name: str, root: Path) -> GeneralTracker:
    import mlflow  # optional: --report-to mlflow checked that it is installed

    given = os.environ.get("MLFLOW_TRACKING_URI")
    if not given:  # mlflow's own default, ./mlflow.db, would land in the working directory and needs sqlalchemy
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a file store without it
    mlflow.set_tracking_uri(given or (root / "mlruns").resolve().as_uri())  # set each time: one process, many runs
    if not given:  # set_tracking_uri exported ours for subprocesses: the next run of this process picks its own
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return MLflowTracker(experiment_name=PROJECT, run_name=run_name)


def _trackio(run_name: str, root: Path) -> GeneralTracker:
    return TrackioTracker(os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_name)


def _mlflow_failed(tracker: GeneralTracker) -> None:
    import mlflow  # optional, installed: the run was started

    mlflow.end_run(status="FAILED")


MAKERS = {"wandb": _wandb, "mlflow": _mlflow, "trackio": _trackio}
FAILED = {"wandb": lambda tracker: tracker.run.finish(exit_code=1), "mlflow": _mlflow_failed}
"""How a tracker's run is ended as failed (the others end it as finished either way)."""


def accelerate_state() -> None:
    """accelerate's trackers log through its logger, which wants a PartialState: made here, on rank 0, once the run's
    process group (if any) exists. torch's thread count is kept (accelerate sets it for a CPU run under torchrun
    when OMP_NUM_THREADS is unset)."""
    threads = torch.get_num_threads()
    PartialState()
    torch.set_num_threads(threads)


class AccelerateSink:
    """wandb, mlflow or trackio through accelerate.tracking: the config once, the numbers each step (wandb also a
    step's samples, as a table)."""

    def __init__(self, name: str, report: Reporting, folder: Path, tag: str, config: Mapping | None):
        accelerate_state()
        root = Path(report.root) if report.root else folder
        root.mkdir(parents=True, exist_ok=True)
        self.name, self.tag = name, tag
        self.tracker = MAKERS[name](report.run_name or folder.resolve().name, root)
        self.tracker.start()
        if config:
            self.tracker.store_init_configuration(flat_config(config))

    def log(self, step: int, scalars: dict, samples: list[dict] | None) -> None:
        if scalars:
            self.tracker.log(scalars, step=step)
        if samples and hasattr(self.tracker, "log_table"):
            rows = [[prompt_text(s["prompt"]), s["completion"], s["score"]] for s in samples]
            self.tracker.log_table(f"{self.tag}/samples", columns=["prompt", "completion", "score"], data=rows,
                                   step=step)

    def close(self, failed: bool) -> None:
        if failed and self.name in FAILED:
            FAILED[self.name](self.tracker)
        else:
            self.tracker.finish()


def open_sinks(report: Reporting, folder: Path, tag: str, resume_step: int | None, config: Mapping | None) -> list:
    """A sink per tracker of `report`, writing for metrics folder `folder`; those opened are closed again when one
    fails to open."""
    sinks = []
    try:
        for name in report.to:
            sinks.append(TensorBoardSink(folder, tag, resume_step, config) if name == "tensorboard"
                         else AccelerateSink(name, report, folder, tag, config))
    except BaseException:
        close_sinks(sinks, failed=True)
        raise
    return sinks


def close_sinks(sinks: list, failed: bool) -> None:
    """Closes every sink, the first error raised after all were tried."""
    errors = []
    for sink in sinks:
        try:
            sink.close(failed)
        except Exception as e:  # the others are still closed
            errors.append(e)
    if errors:
        raise errors[0]
