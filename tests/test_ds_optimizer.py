"""The DeepSpeed op a --ds-config's `optimizer` section makes DeepSpeed compile is announced before it starts, with
how to do without (commands/ds_optimizer.py). Nothing is compiled: the cache directory is a temporary one."""

import json

import pytest

from hybrid_engine.commands.ds_optimizer import build_note, optimizer_op
from hybrid_engine.commands.main import main


def write_ds_config(tmp_path, **config) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}, **config}))
    return str(path)


def test_an_optimizer_section_is_announced_before_deepspeed_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    path = write_ds_config(tmp_path, optimizer={"type": "AdamW", "params": {"lr": 1e-4}})
    note = build_note(path)
    cache = tmp_path / "ext" / "fused_adam"
    assert note.startswith(f"note: {path} has an `optimizer` section (AdamW): DeepSpeed compiles its fused_adam op "
                           f"before the first step (minutes on a CPU, once; cached in {cache})")
    assert note.endswith("Without the section training uses torch's AdamW, which needs no compile")
    (tmp_path / "ext" / "fused_adam" / "fused_adam.so").write_bytes(b"")
    assert build_note(path) is None  # built once already: nothing to announce


def test_the_op_follows_the_optimizer_and_its_offload():
    adam = {"type": "Adam", "params": {}}
    assert optimizer_op({"optimizer": adam}) == "fused_adam"
    offload = {"offload_optimizer": {"device": "cpu"}}
    assert optimizer_op({"optimizer": adam, "zero_optimization": offload}) == "cpu_adam"
    assert optimizer_op({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}) is None
    assert optimizer_op({"optimizer": {"type": "SGD"}}) is None and optimizer_op({}) is None


def test_the_command_prints_the_note_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    path = write_ds_config(tmp_path, optimizer={"type": "Adam"})
    with pytest.raises(ValueError, match="--eval-fraction"):
        main(["sft", "--demo", "--ds-config", path, "--eval-fraction", "2", "--output", str(tmp_path / "out")])
    assert capsys.readouterr().err.startswith(f"note: {path} has an `optimizer` section (Adam)")
