"""A training command's output folder: one run at a time, never over another run by accident.

claim_output, before any data or model loads (on the main rank, which writes):
- refuses an --output that is a file, that cannot be written, or that holds one of the run's input models;
- locks the folder with LOCK_FILE, which holds the run's pid: a second run into it is refused while the first is
  alive; a lock whose process is gone (a killed run) is taken over, with a note;
- refuses a folder that already holds something, unless the run continues it (--resume) or replaces it
  (--overwrite, which clears it first, and only a folder that holds a hybrid-engine run).
The lock goes when the command ends (OutputLock.release), with the folder itself when the run left nothing in it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from hybrid_engine._build_lock import process_alive
from hybrid_engine.rlhf.distributed import is_main_rank

LOCK_FILE = ".hybrid-engine.lock"
RUN_MARKERS = ("summary.json", "checkpoints", "step_result.json", "config.json", "metrics.jsonl", "sft", "reward",
               "ppo", ".final.tmp")
"""Any of these in a folder means a hybrid-engine run wrote there (what --overwrite may clear)."""


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


class OutputLock:
    """The claim of one run on its output folder; release() (or leaving the `with` block) gives it up."""

    def __init__(self, folder: Path | None = None, created: bool = False):
        self.folder, self.created = folder, created

    def release(self) -> None:
        if self.folder is None:
            return
        lock = self.folder / LOCK_FILE
        if _read_lock(lock).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
        if self.created and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()  # a run that failed before writing anything leaves nothing behind
        self.folder = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_lock(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _not_writable(output: str, e: OSError) -> ValueError:
    return ValueError(f"--output {output} is not writable ({e.strerror or e}): the trained model could not be saved "
                      "there; give another --output")


def _take_lock(folder: Path, output: str) -> None:
    lock = folder / LOCK_FILE
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                       "command": " ".join(sys.argv[1:3])}) + "\n"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(lock)
            other_host = held.get("host", socket.gethostname()) != socket.gethostname()
            if other_host or process_alive(held.get("pid")):
                where = f" on {held['host']}" if other_host else ""
                raise ValueError(f"--output {output} is in use by another run (pid {held.get('pid')}{where}): wait "
                                 f"for it to end or give another --output (if no run uses it, delete {lock})") from None
            note(f"{lock} was left by a run that is no longer running (pid {held.get('pid')}); taking it over")
            lock.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise _not_writable(output, e) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(mine)
        except OSError as e:
            lock.unlink(missing_ok=True)
            raise _not_writable(output, e) from None
        return
    raise ValueError(f"--output {output}: another run took its lock ({lock}) at the same moment; give another "
                     "--output")


def claim_output(output: str, *, resume: bool, overwrite: bool, inputs: list[tuple[str, str | None]] = ()
                 ) -> OutputLock:
    """Locks the run's output folder and checks it (see the module's docstring); a no-op lock on ranks other
    than the main one. inputs: (flag, path) of what the run reads, none of which may lie in the folder."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: --resume continues the run in --output, "
                         "--overwrite clears it and starts a new one")
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder: give a folder to save the model in")
    for flag, given in inputs:
        if given and Path(given).exists():
            source = Path(given).resolve()
            if source == folder.resolve() or folder.resolve() in source.parents:
                raise ValueError(f"{flag} {given} lies in --output {output}, which the run writes (and --overwrite "
                                 "clears): give another --output")
    if not is_main_rank():
        return OutputLock()
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _not_writable(output, e) from None
    _take_lock(folder, output)
    claim = OutputLock(folder, created)
    try:
        entries = sorted(e.name for e in folder.iterdir() if e.name != LOCK_FILE)
        if entries and not resume:
            listed = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            is_run = any(name in RUN_MARKERS for name in entries)
            if not is_run:
                raise ValueError(f"--output {output} is not empty ({listed}) and holds no hybrid-engine run: give a "
                                 "new or empty folder")
            if not overwrite:
                raise ValueError(f"--output {output} already holds a run ({listed}): pass --overwrite to replace "
                                 "it, or --resume to continue it")
            for name in entries:
                path = folder / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            note(f"--overwrite: cleared {output} ({listed})")
    except BaseException:
        claim.release()
        raise
    return claim
