"""Known messages of the libraries underneath that tell a user of the command line nothing, silenced or replaced by
one line of ours. Only these messages: every other warning of DeepSpeed, transformers or torch still shows.

- DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.", logged
  on its import on a machine without a GPU: a CPU is what such a machine has (`hybrid-engine env` says which).
- transformers' LOAD REPORT table when a reward model (a body without a language-model head) loads a causal LM's
  directory, whose only rows are `lm_head.* | UNEXPECTED`: replaced by one line saying the head is not used.
"""

from __future__ import annotations

import logging
import re

ACCELERATOR_CPU = "Setting accelerator to CPU."
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _DropDeepSpeedAcceleratorCPU(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ACCELERATOR_CPU)


def unused_lm_head(message: str) -> str | None:
    """The model path of a transformers LOAD REPORT whose rows are all `lm_head.* | UNEXPECTED` (a causal LM's head
    that a body-only model does not load); None for any other message or report."""
    text = _ANSI.sub("", message)
    first, _, rest = text.partition("\n")
    if " LOAD REPORT from: " not in first:
        return None
    rows = [[cell.strip() for cell in line.split("|")] for line in rest.splitlines() if "|" in line][1:]
    if not rows or any(not (r[0].startswith("lm_head.") and r[1] == "UNEXPECTED") for r in rows):
        return None
    return first.split(" LOAD REPORT from: ", 1)[1].strip()


class _OneLineForUnusedLMHead(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        path = unused_lm_head(record.getMessage())
        if path is not None:
            record.msg, record.args = (f"{path}: the causal LM's lm_head is not loaded (a reward model scores with "
                                       "its own head)"), ()
        return True


# (logger name, filter): the loggers the messages come from. A filter set before the library creates its logger
# stays on it (DeepSpeed's logger is made when deepspeed is imported, which our trainers do late).
FILTERS = (("DeepSpeed", _DropDeepSpeedAcceleratorCPU), ("transformers.modeling_utils", _OneLineForUnusedLMHead))


def silence_known_noise() -> None:
    """Puts the filters on their loggers, once however often it is called."""
    for name, cls in FILTERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())
