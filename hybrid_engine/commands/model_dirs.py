"""The commands' saved models and tokenizers: checking a directory before loading it, finding its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

from hybrid_engine.rlhf.reward import HEAD_FILE

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")
"""Any of these in a directory means a tokenizer was saved there."""


def check_model_dir(directory: str, flag: str = "--model", reward_ok: bool = False) -> Path:
    """`directory` as a Path once it is known to hold a saved Hugging Face model (its config.json); a reward
    model (value_head.safetensors beside the body) only when reward_ok."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"{flag} {directory}: no such directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{flag} {directory}: not a saved Hugging Face model (no config.json); give a directory "
                         "written by save_pretrained")
    if not reward_ok and (path / HEAD_FILE).is_file():
        raise ValueError(f"{flag} {directory}: holds a reward model ({HEAD_FILE}), not a causal LM")
    return path


def has_tokenizer(directory: str | os.PathLike | None) -> bool:
    """Whether `directory` holds a saved tokenizer."""
    return directory is not None and any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(directory: str | os.PathLike, flag: str = "--tokenizer"):
    """transformers.AutoTokenizer from a local directory; a clear error when it holds none."""
    if not Path(directory).is_dir():
        raise ValueError(f"{flag} {directory}: no such directory")
    if not has_tokenizer(directory):
        raise ValueError(f"{flag} {directory}: no tokenizer there (none of {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer  # here, when one is loaded: resolving it costs start-up about 0.4 s

    return AutoTokenizer.from_pretrained(str(directory))
