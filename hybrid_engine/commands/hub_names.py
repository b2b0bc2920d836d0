"""A model or tokenizer flag given as a Hugging Face name (`Qwen/Qwen3-0.6B`) instead of a folder: its snapshot in the
local Hugging Face cache, or downloaded into it when the Hub may be reached.

A folder of that name here always wins. A name in the cache is used as it is (no network call); one that is not is
downloaded with a printed line, unless HF_HUB_OFFLINE is set, when it fails at once naming the cache it looked in.
"""

from __future__ import annotations

import sys
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

from hybrid_engine.rlhf.distributed import is_main_rank


def is_hub_name(text: str) -> bool:
    """Whether `text` is not a folder here and reads as a Hub repository id (`name` or `org/name`)."""
    if Path(text).exists():
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def local_path(text: str, flag: str) -> Path:
    """`text` as a folder: itself, or the cached (else downloaded) snapshot of the Hub model it names."""
    if not is_hub_name(text):
        return Path(text)
    try:
        return Path(snapshot_download(text, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{flag} {text}: no such folder, and no snapshot of that Hugging Face model in the local "
                         f"cache {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE is set, so nothing is downloaded)")
    if is_main_rank():
        print(f"downloading {text} from the Hugging Face Hub into {constants.HF_HUB_CACHE}", file=sys.stderr)
    try:
        return Path(snapshot_download(text))
    except Exception as e:  # noqa: BLE001 - the Hub's many errors (no network, no such repo, gated) are one line here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{flag} {text}: no such folder, and the Hugging Face model could not be downloaded "
                         f"({first})") from None
