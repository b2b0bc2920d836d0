"""The commands' saved models and tokenizers: checking a directory before loading it, finding its tokenizer."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import tokenizers
import transformers

from hybrid_engine.commands.hub_names import local_path
from hybrid_engine.rlhf.reward_format import is_reward_model_dir

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")
"""Any of these in a directory means a tokenizer was saved there."""
SAMPLE = ("what is 3 plus 4", "The quick brown fox jumps over the lazy dog.", "Hello, world! It's 2026: 42 + 7 = 49.")
"""Texts a loaded tokenizer must split as its own tokenizer.json does, beside a sample of the data."""


def check_model_dir(directory: str, flag: str = "--model", reward_ok: bool = False) -> Path:
    """`directory` (or the cached snapshot of the Hugging Face model it names: hub_names.py) as a Path once it is
    known to hold a saved Hugging Face model (its config.json); a reward model (a sequence classifier, or
    value_head.safetensors beside the body) only when reward_ok."""
    path = local_path(directory, flag)
    if not path.is_dir():
        raise ValueError(f"{flag} {directory}: no such directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{flag} {directory}: not a saved Hugging Face model (no config.json); give a directory "
                         "written by save_pretrained")
    if not reward_ok and is_reward_model_dir(path):
        raise ValueError(f"{flag} {directory}: holds a reward model (a sequence classifier), not a causal LM")
    return path


def has_tokenizer(directory: str | os.PathLike | None) -> bool:
    """Whether the folder `directory` holds a saved tokenizer."""
    return directory is not None and any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(directory: str | os.PathLike, flag: str = "--tokenizer", sample: Sequence[str] = ()):
    """transformers.AutoTokenizer from a local directory; a clear error when it holds none. The tokenizer is checked
    against the directory's own tokenizer.json on `sample` (a few texts of the data) and SAMPLE (round_trip).
    A Hugging Face name is its snapshot in the local cache (hub_names.py)."""
    directory = local_path(str(directory), flag)
    if not Path(directory).is_dir():
        raise ValueError(f"{flag} {directory}: no such directory")
    if not has_tokenizer(directory):
        raise ValueError(f"{flag} {directory}: no tokenizer there (none of {', '.join(TOKENIZER_FILES)})")
    return round_trip(transformers.AutoTokenizer.from_pretrained(str(directory)), Path(directory), flag, sample)


def round_trip(tokenizer, directory: Path, flag: str, sample: Sequence[str] = ()):
    """`tokenizer` if it encodes `sample` and SAMPLE as the directory's tokenizer.json does (or there is none).

    Otherwise a warning naming both classes and the first text they split differently. Under transformers 5,
    AutoTokenizer picks the class of the model's type over the one saved: a Qwen2 directory saved with a WordLevel
    tokenizer reloads as Qwen2Tokenizer, which rebuilds a BPE from the vocabulary and reads 'what is 3 plus 4' as
    ['3', '4']. When the saved class (tokenizer_config.json's tokenizer_class) was overridden so, the directory
    is loaded with the saved class instead, and the warning says so."""
    file = directory / "tokenizer.json"
    if not file.is_file():
        return tokenizer
    own = tokenizers.Tokenizer.from_file(str(file))
    text = next((t for t in [*sample, *SAMPLE] if t and tokenizer(t, add_special_tokens=False)["input_ids"]
                 != own.encode(t, add_special_tokens=False).ids), None)
    if text is None:
        return tokenizer
    config = directory / "tokenizer_config.json"
    saved = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    saved_cls = getattr(transformers, str(saved), None)
    heard = tokenizer.tokenize(text)
    use = isinstance(saved_cls, type) and type(tokenizer) is not saved_cls
    if use:
        fixed = saved_cls.from_pretrained(str(directory))
        use = fixed(text, add_special_tokens=False)["input_ids"] == own.encode(text, add_special_tokens=False).ids
    print(f"warning: {flag} {directory}: AutoTokenizer loads it as {type(tokenizer).__name__}, which splits "
          f"{text!r} as {heard} where its tokenizer.json ({type(own.model).__name__} model) gives "
          f"{own.encode(text, add_special_tokens=False).tokens}; "
          + (f"using the saved class {saved} instead" if use else "check that this is the tokenizer you trained "
             "with"), file=sys.stderr)
    return fixed if use else tokenizer
