"""Checkpoints of a training run, to resume it after a crash or a kill, to the bit.

A checkpoint is a folder `checkpoints/step-N/` beside the run's output: `tensors.safetensors` (what rank 0 writes for
every rank: the trained weights, torch optimizers' state tensors, an EMA, and in one process the RNG states),
`state.json` (the data position, the history so far, the optimizers' hyper-parameters, the run's layout: world size,
ZeRO stage, LoRA), under torch.distributed each rank's `optimizer-rank<r>.safetensors` and `optimizer-rank<r>.json`
(its RNG states and, under ZeRO 1-3, its partition of the optimizer state: moments and fp32 master weights), and
`manifest.json` (the size and SHA-256 of every other file, every rank's). What goes where: train_state.py. Loading
one reads tensors and JSON only: no pickle. Every rank writes its files into a temporary folder; after a barrier
rank 0 writes its own and the manifest and renames the folder into place, so a kill mid-write leaves the previous
checkpoint whole; the run's newest `keep` are kept.

Resuming checks every file against the manifest: a damaged newest checkpoint is named and the newest intact one
is used. Checkpoints written before manifests existed load unchecked, with a note. A checkpoint resumes only under
the ZeRO stage and LoRA it was written with (check_same_layout); on another number of ranks its ZeRO optimizer state
is re-cut (engine/zero_rescale.py) and the per-rank batch sizes must keep the global batch (check_same_config).

A run never starts over an earlier run's checkpoints (check_output): it resumes them, or its output folder is
cleared first. The final model is written atomically (save_final): to a temporary folder, then moved into place.

Supported: plain torch in one process and DeepSpeed ZeRO 0-3, with or without LoRA (tested without offload; NVMe
offload is not covered, and ZeRO-1/2's elastic_checkpoint is refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hybrid_engine.rlhf.distributed import rank_and_world
from hybrid_engine.rlhf.loop import LoopRecord, evals_json
from hybrid_engine.rlhf.step_config import config_dict
from hybrid_engine.rlhf.train_state import Snapshot, Trained, layout, restore_training, snapshot

STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT = "hybrid_engine.checkpoint.v1"
MANIFEST = "manifest.json"
"""A checkpoint's list of its files with their sizes and SHA-256 checksums."""
FINAL_TMP = ".final.tmp"
"""Where save_final writes the final model before moving it into the output folder."""


def note(text: str) -> None:
    """A one-line note on stderr, from rank 0 only."""
    if rank_and_world()[0] == 0:
        print(f"note: {text}", file=sys.stderr, flush=True)


def check_supported(config, resume) -> None:
    """Refuses checkpointing (config.checkpoint_every or resume) where it cannot work, before training starts."""
    if not (config.checkpoint_every or resume):
        return
    if config.output_dir is None:
        raise ValueError("checkpoints live under output_dir/checkpoints: set output_dir to write or resume them")


def check_output(config, resume) -> None:
    """Before training: config.output_dir (when set) is a folder this run can write, and holds no checkpoints of
    an earlier run unless this run resumes them (a new run would prune them in among its own, and a later resume
    would continue the old run)."""
    if config.output_dir is None:
        return
    check_writable(config.output_dir)
    found = checkpoints(config.output_dir)
    if found and not resume:
        raise ValueError(f"{config.output_dir} holds checkpoints of an earlier run (newest {found[-1].name}): "
                         "resume it (--resume, resume=True), or start over in an empty folder (the commands' "
                         "--overwrite clears it)")


def check_writable(output_dir: str | os.PathLike) -> None:
    """Creates output_dir (rank 0) and writes a probe file there: a folder that cannot hold the model fails now,
    not after training."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {output_dir} is a file, not a folder: give a folder to save the model in")
    if rank_and_world()[0] != 0:
        return
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"hybrid-engine")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output folder {output_dir} is not writable ({e.strerror or e}): the trained model "
                         "could not be saved there") from None


# -- writing and finding ----------------------------------------------------------------------------------------


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(folder: Path) -> int:
    return int(STEP_DIR.match(folder.name).group(1))


def rank_files(rank: int) -> tuple[str, str]:
    """The names of a rank's own files in a checkpoint: its tensors and its JSON."""
    return f"optimizer-rank{rank}.safetensors", f"optimizer-rank{rank}.json"


def save_checkpoint(output_dir: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], state: dict,
                    keep: int = 2, rank_tensors: dict[str, torch.Tensor] | None = None,
                    rank_state: dict | None = None) -> Path | None:
    """Writes checkpoints/step-<step>/ atomically with its manifest, and keeps the run's newest `keep`. Every rank
    calls this; rank 0 writes `tensors` and `state`; with rank_tensors (every rank gives them or none does) each rank
    writes its own files first, and rank 0 renames the folder into place once every rank's are there. Checkpoints
    of later steps are not this run's past (left by the run it resumed from an earlier checkpoint of, or damaged):
    they are removed, so that a later resume finds this run's newest."""
    root = checkpoint_root(output_dir)
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    rank, world = rank_and_world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if rank_tensors is not None:
        _barrier()  # the folder exists
        names = rank_files(rank)
        save_file(_cpu(rank_tensors), str(tmp / names[0]), metadata={"format": FORMAT})
        (tmp / names[1]).write_text(json.dumps(rank_state or {}) + "\n")
        _fsync_files(tmp / name for name in names)
        _barrier()  # every rank's files are written
    if rank == 0:
        save_file(_cpu(tensors), str(tmp / "tensors.safetensors"), metadata={"format": FORMAT})
        rank_count = None if rank_tensors is None else world
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "step": step, "rank_files": rank_count,
                                                    **state}) + "\n")
        _fsync_files(tmp / name for name in ("tensors.safetensors", "state.json"))
        manifest = {"format": FORMAT, "files": {p.name: file_entry(p) for p in sorted(tmp.iterdir())}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _fsync_files([tmp / MANIFEST])
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        found = checkpoints(output_dir)
        for old in [p for p in found if step_of(p) > step] + [p for p in found if step_of(p) <= step][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def file_entry(path: Path) -> dict:
    """A manifest's record of one file: its size and SHA-256, read back from the disk."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync_files(paths) -> None:
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints under output_dir, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "state.json").is_file() and (p / "tensors.safetensors").is_file()]


_checked: dict[tuple, str | None] = {}
"""damage() of each checkpoint folder as its files stood (name, size, mtime) when checked."""


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (None: nothing): each file against its manifest's size and SHA-256;
    a checkpoint written before manifests existed is only read, with a note."""
    key = (str(folder.resolve()), tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                               for p in folder.iterdir())))
    if key not in _checked:
        _checked[key] = _damage(folder)
    return _checked[key]


def _damage(folder: Path) -> str | None:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        note(f"checkpoint {folder} has no checksums (written by an earlier version): it is read unchecked")
        try:
            json.loads((folder / "state.json").read_text())
            load_file(str(folder / "tensors.safetensors"))
        except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError, a JSON error: a damaged file
            return f"unreadable ({type(e).__name__}: {e})"
        return None
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, not the {want['bytes']} written"
        if file_entry(path)["sha256"] != want["sha256"]:
            return f"{name} does not match its SHA-256 checksum"
    return None


_noted: set[str] = set()


def newest_checkpoint(output_dir: str | os.PathLike) -> Path:
    """The newest intact checkpoint under output_dir; each damaged newer one is named in a note (once)."""
    found = checkpoints(output_dir)
    if not found:
        raise ValueError(f"no checkpoint to resume from in {output_dir} (looked for "
                         f"{checkpoint_root(output_dir)}/step-N)")
    damaged = []
    for folder in reversed(found):
        problem = damage(folder)
        if problem is None:
            for bad, why in damaged:
                text = f"checkpoint {bad} is damaged ({why}): resuming from {folder}, the newest intact one"
                if text not in _noted:
                    _noted.add(text)
                    note(text)
            return folder
        damaged.append((folder, problem))
    raise ValueError(f"every checkpoint under {checkpoint_root(output_dir)} is damaged: "
                     + "; ".join(f"{folder.name}: {why}" for folder, why in damaged))


def load_checkpoint(path: str | os.PathLike, layout_now: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder, or of the newest intact one under an output directory
    (newest_checkpoint): rank 0's tensors with this rank's own (its RNG, its ZeRO partition), state.json with what
    this rank ran (save_snapshot's `own`) and its ZeRO optimizers' JSON as state["rank_state"]. Every file is
    checked against the checkpoint's manifest first; with layout_now (train_state.layout), the checkpoint's layout
    against it (check_same_layout)."""
    path = Path(path)
    if (path / "state.json").is_file():
        problem = damage(path)
        if problem is not None:
            raise ValueError(f"checkpoint {path} is damaged: {problem}")
    else:
        path = newest_checkpoint(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a hybrid-engine checkpoint (format {state.get('format')!r})")
    if layout_now is not None:
        check_same_layout(state.get("layout"), layout_now, path)
    tensors = load_file(str(path / "tensors.safetensors"))
    rank, world = rank_and_world()
    if state.get("rank_files") == world:
        names = rank_files(rank)
        tensors.update(load_file(str(path / names[0])))
        mine = json.loads((path / names[1]).read_text())
        state.update(mine["own"], rank_state=mine["zero"])
    elif state.get("rank_files"):
        tensors, state = tensors | rank_rng(path, rank, state["rank_files"]), state | other_world(path, state)
    return tensors, state


def other_world(path: Path, state: dict) -> dict:
    """What a run on another number of ranks than the checkpoint's takes of its ranks' files: every saved rank's
    ZeRO tensors and JSON ("zero_ranks", which train_state re-cuts), and the run record (losses, history) of the
    saved rank of its own number, or of rank 0 for a rank the checkpoint had not."""
    rank, world = rank_and_world()
    saved = state["rank_files"]
    others = "the others start from the one a fresh run seeds" if world > saved else "the others' are dropped"
    note(f"checkpoint {path} was written by {plural(saved, 'rank')}, this run has {world}: ZeRO optimizer partitions "
         f"are merged and re-cut for {world}; ranks below {min(saved, world)} keep their RNG states, {others} "
         "(docs/rlhf.md: Resuming on another number of ranks)")
    zero_ranks = []
    for r in range(saved):
        names = rank_files(r)
        zero_ranks.append((load_file(str(path / names[0])), json.loads((path / names[1]).read_text())))
    mine = zero_ranks[rank if rank < saved else 0][1]
    return {**mine["own"], "zero_ranks": [(tensors, rank_json["zero"]) for tensors, rank_json in zero_ranks]}


def rank_rng(path: Path, rank: int, saved: int) -> dict[str, torch.Tensor]:
    """The RNG states saved rank `rank` wrote (none where the checkpoint had no such rank)."""
    if rank >= saved:
        return {}
    return {k: v for k, v in load_file(str(path / rank_files(rank)[0])).items() if k.startswith("rng.")}


def plural(count: int, noun: str) -> str:
    """'1 rank', '2 ranks'."""
    return f"{count} {noun}" + ("s" if count != 1 else "")


def describe_layout(layout: dict) -> str:
    """A layout as words: '2 ranks, ZeRO stage 3, LoRA'."""
    stage = "plain torch" if layout.get("zero_stage") is None else f"ZeRO stage {layout['zero_stage']}"
    ranks = plural(layout.get("world_size"), "rank")
    return f"{ranks}, {stage}, {'LoRA' if layout.get('lora') else 'every weight trained'}"


def check_same_layout(saved: dict | None, now: dict, path: str | os.PathLike) -> None:
    """Refuses a checkpoint written under another ZeRO stage or LoRA than this run's, naming both; another world
    size is fine (load_checkpoint re-cuts its ZeRO state)."""
    if saved is None:
        note(f"checkpoint {path} was written before checkpoints recorded their world size, ZeRO stage and LoRA: "
             "they are not compared")
        return
    if any(saved.get(k) != now.get(k) for k in ("zero_stage", "lora")):
        raise ValueError(f"checkpoint {path} was written under {describe_layout(saved)}; this run has "
                         f"{describe_layout(now)}: resume it under the same ZeRO stage and LoRA (converting a "
                         "checkpoint to another ZeRO stage or LoRA is not supported; another number of ranks is)")


# -- the final model ----------------------------------------------------------------------------------------------


def save_final(output_dir: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """The trained model into output_dir, atomically: write(folder) (every rank calls it; rank 0 writes) fills a
    temporary folder beside the run's other files, whose entries are then renamed into output_dir. A failure (a
    full disk) leaves none of the model there, and its error says where the newest checkpoint is."""
    output = Path(output_dir)
    tmp = output / FINAL_TMP
    rank = rank_and_world()[0]
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        write(tmp)
        if rank == 0:
            for entry in sorted(tmp.iterdir()):
                _fsync_tree(entry)
            for entry in sorted(tmp.iterdir()):
                target = output / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
            tmp.rmdir()
    except Exception as e:  # OSError, or safetensors' SafetensorError wrapping one (a full disk)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        found = checkpoints(output)
        kept = (f"the newest checkpoint, {found[-1]}, is kept: resume from it (--resume) once the fault is fixed"
                if found else "no checkpoint was written to resume from (checkpoint_every, --checkpoint-every N)")
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise OSError(getattr(e, "errno", None), f"saving the trained model to {output_dir} failed ({why}); "
                      f"none of it was left there; {kept}") from e
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _fsync_tree(child)
    else:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


# -- a run's trained models -------------------------------------------------------------------------------------


def config_json(config, ignored: tuple[str, ...] = ("checkpoint_every", "keep_checkpoints", "output_dir",
                                                   "log_samples", "save_adapters_only")) -> dict:
    """A step config as JSON, without the fields that decide only what is written."""
    return {k: v for k, v in config_dict(config).items() if k not in ignored}


MAY_CHANGE = ("max_steps",)
"""Settings a resumed run may change (with a note) beside those config_json leaves out: the run goes on to the new
step count, the learning-rate schedule following the new total from there."""


PER_RANK = ("batch_size", "train_batch_size")
"""Settings counted per rank, whose global value (times the ranks) a run resumed on another number of ranks keeps:
the same global batches in the same order (schedule.batch_order cuts the data into batch_size x ranks rows)."""


def check_same_config(saved: dict, config, saved_world: int | None = None) -> None:
    """Refuses a checkpoint written with other settings than `config`'s, but for MAY_CHANGE's; a setting newer
    than the checkpoint is the same when `config` leaves it at its default (which the older run had in effect).
    saved_world: the checkpoint's number of ranks; on another, PER_RANK's settings must keep their global value
    (check_global_batch)."""
    now = config_json(config)
    defaults = config_json(type(config)())
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                     and not (k not in saved and now.get(k) == defaults.get(k)))
    for key in [k for k in changed if k in MAY_CHANGE]:
        note(f"resuming with {key} {now.get(key)} (the checkpoint's run had {saved.get(key)})")
    world = rank_and_world()[1]
    if saved_world is not None and saved_world != world:
        check_global_batch(saved, now, saved_world, world)
        changed = [k for k in changed if k not in PER_RANK]
    changed = [k for k in changed if k not in MAY_CHANGE]
    if changed:
        raise ValueError(f"the checkpoint was written with other settings ({', '.join(changed)}): resume with the "
                         "settings it ran with")


def check_global_batch(saved: dict, now: dict, saved_world: int, world: int) -> None:
    """Refuses a per-rank batch (PER_RANK) that would change the global batch of a run resumed on `world` ranks
    instead of the checkpoint's `saved_world`, naming the value to give."""
    for key in [k for k in PER_RANK if k in saved]:
        rows = saved[key] * saved_world
        if now.get(key) * world == rows:
            continue
        flag = "--" + key.replace("_", "-")
        fix = (f"give {key} {rows // world} ({flag} {rows // world}) to keep it" if rows % world == 0
               else f"{rows} rows do not split over {world} ranks: resume on a number of ranks that divides them")
        raise ValueError(f"{key} is per rank: the checkpoint's run took {saved[key]} a rank on "
                         f"{plural(saved_world, 'rank')}, {rows} rows a step; this run takes {now.get(key)} a rank on "
                         f"{plural(world, 'rank')}, {now.get(key) * world}: {fix}")


# -- what else defines a run ------------------------------------------------------------------------------------

RUN_PARTS = {"data": "training and held-out rows (--data, --data-split, --eval-fraction)",
             "model": "starting model (--model)", "reference": "KL reference (--reference, by default --model)",
             "reward_model": "reward model (--reward-model)", "reward_fn": "reward function (--reward-fn)",
             "eval_fn": "eval function (--eval-fn)", "ptx": "pre-training rows (--ptx-data)"}
"""What defines a run beside its config, recorded in its checkpoints as fingerprints and compared on resume."""


def check_same_run(saved: dict | None, now: dict) -> None:
    """Refuses a checkpoint that another run wrote: one whose data, models or reward differ from this run's."""
    if saved is None:
        note("the checkpoint was written before runs recorded their data and models: they are not compared")
        return
    changed = [RUN_PARTS[k] for k in RUN_PARTS if saved.get(k) != now.get(k)]
    if changed:
        raise ValueError(f"the checkpoint was written by another run ({', '.join('other ' + c for c in changed)}): "
                         "resume with what it ran with, or start a new run (--overwrite)")


def saved_world(state: dict) -> int | None:
    """The number of ranks a checkpoint was written on (None: not recorded)."""
    return (state.get("layout") or {}).get("world_size")


def resume_path(config, resume) -> str | os.PathLike:
    """The folder `resume` names: config.output_dir for True, else the given path."""
    return config.output_dir if resume is True else resume


class TrainedState:
    """The checkpoint of an SFT or reward-model run (loop.RunState): the trained models, their optimizers, the RNG,
    the losses and evaluations so far. eval_type rebuilds a saved evaluation (None: it is saved as it is)."""

    def __init__(self, config, trained: Trained, eval_type: type | None = None, run: dict | None = None,
                 zero_stage: int | None = None):
        """run: what defines the run beside its config (RUN_PARTS: fingerprints of its rows and starting model).
        zero_stage: the DeepSpeed ZeRO stage the models train under (None: plain torch)."""
        self.config, self.trained, self.eval_type, self.run = config, trained, eval_type, run or {}
        self.layout = run_layout(config, trained, zero_stage)

    def save(self, record: LoopRecord) -> None:
        snap = snapshot(self.trained, adapters_only=self.layout["adapters_only"])
        own = {"losses": record.history, "evals": evals_json(record.evals), "train_s": record.train_s}
        state = {"config": config_json(self.config), "run": self.run, "layout": self.layout,
                 "optimizers": snap.optimizers}
        save_snapshot(self.config, record.steps, snap, state, own)

    def restore(self, resume: bool | str, record: LoopRecord) -> None:
        tensors, state = load_checkpoint(resume_path(self.config, resume), self.layout)
        check_same_config(state["config"], self.config, saved_world(state))
        check_same_run(state.get("run"), self.run)
        restore_training(self.trained, tensors, state)
        record.history, record.train_s, record.steps = state["losses"], state["train_s"], state["step"]
        record.evals = [(step, self.eval_type(**e) if self.eval_type is not None and e is not None else e)
                        for step, e in state["evals"]]


def run_layout(config, trained: Trained, zero_stage: int | None) -> dict:
    """train_state.layout of a run, with config.save_adapters_only (a note when there is no LoRA for it to
    leave the frozen weights out of)."""
    out = layout(trained, zero_stage, bool(getattr(config, "save_adapters_only", False)))
    if out["adapters_only"] and not out["lora"] and config.checkpoint_every:
        note("save_adapters_only keeps only LoRA adapters in checkpoints; this run has no LoRA and trains every "
             "weight, so its checkpoints hold them all")
    return out


def save_snapshot(config, step: int, snap: Snapshot, state: dict, own: dict) -> Path | None:
    """save_checkpoint of a train_state.Snapshot and the run's `state`; `own` is what each rank ran (its losses,
    evaluations and the like): rank 0's goes into state.json, and each rank's into its own JSON whenever the run
    is distributed, where load_checkpoint reads it back from."""
    distributed = torch.distributed.is_initialized()
    mine = {"zero": snap.rank_state, "own": own}
    return save_checkpoint(config.output_dir, step, snap.shared, {**state, **own}, config.keep_checkpoints,
                           snap.rank if distributed else None, mine if distributed else None)
