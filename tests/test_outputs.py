"""Output folders and checkpoints lose nothing, and a resume continues its own run: a new run never starts over an
earlier run's checkpoints (nor prunes them in among its own), one run at a time holds a folder (a lock with its pid),
a folder holding a run is replaced only with --overwrite, an unwritable output fails before training, the final
model is written atomically, a damaged checkpoint is found by its checksums and passed over for the newest intact
one, and a resume with other data, models or reward functions is refused by name."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from demo_models import demo_llama, demo_rows, save_demo_llama, tokenizer

from hybrid_engine.commands.main import main
from hybrid_engine.commands.outputs import LOCK_FILE
from hybrid_engine.engine import HybridEngine
from hybrid_engine.rlhf import SFTConfig, train_sft
from hybrid_engine.rlhf.checkpoint import FINAL_TMP, MANIFEST, checkpoints, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_demo_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    from hybrid_engine.rlhf.demo import DEMO_DIR

    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("\n".join((DEMO_DIR / "sft.jsonl").read_text().splitlines()[:40]) + "\n")
    return path


def _sft(cache: str, out, resume=False, **config):
    data = demo_rows("sft", 64, 8, cache)
    settings = dict(max_steps=6, batch_size=4, lr=1e-3, eval_every=2, checkpoint_every=2, output_dir=str(out))
    return train_sft(demo_llama(), tokenizer(), data, SFTConfig(**{**settings, **config}), progress=False,
                     resume=resume)


def _sft_command(model_dir, sft_file, cache, out, *extra) -> list[str]:
    return ["sft", "--model", str(model_dir), "--data", str(sft_file), "--batch-size", "4", "--max-steps", "2",
            "--output", str(out), "--cache-dir", cache, "--no-progress", *extra]


# -- 19: an earlier run's checkpoints ---------------------------------------------------------------------------


def test_a_new_run_refuses_a_folder_with_an_earlier_runs_checkpoints(cache, tmp_path):
    _sft(cache, tmp_path, max_steps=12)  # leaves step-8 and step-10
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(newest step-10\): resume it"):
        _sft(cache, tmp_path)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-8", "step-10"]  # untouched


def test_pruning_keeps_the_runs_own_newest(tmp_path):
    tensors = {"x": torch.zeros(2)}
    for step in (10, 12):  # left by a run this one resumed from an earlier checkpoint of
        save_checkpoint(tmp_path, step, tensors, {}, keep=2)
    save_checkpoint(tmp_path, 2, tensors, {}, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-2"]  # not pruned as the oldest
    save_checkpoint(tmp_path, 4, tensors, {}, keep=2)
    save_checkpoint(tmp_path, 6, tensors, {}, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-4", "step-6"]
    assert load_checkpoint(tmp_path)[1]["step"] == 6


# -- 20: one run per folder, --overwrite ------------------------------------------------------------------------


def test_a_folder_holding_a_run_is_refused_unless_overwrite_which_clears_it(model_dir, sft_file, cache, tmp_path,
                                                                           capsys):
    out = tmp_path / "out"
    assert main(_sft_command(model_dir, sft_file, cache, out)) == 0
    assert not (out / LOCK_FILE).exists()  # released at the end
    for name in ("critic", "tensorboard"):  # what a PPO run leaves beside its model (sft writes tensorboard/ too)
        (out / name).mkdir(exist_ok=True)
        (out / name / "old").write_text("an earlier run's\n")
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"^--output .* already holds a run \(.*\): pass --overwrite to replace it, "
                                         r"or --resume to continue it$"):
        main(_sft_command(model_dir, sft_file, cache, out))
    capsys.readouterr()
    assert main(_sft_command(model_dir, sft_file, cache, out, "--overwrite")) == 0
    assert f"note: --overwrite: cleared {out}" in capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names and "summary.json" in names
    assert not names & {"critic", LOCK_FILE, FINAL_TMP}
    assert not (out / "tensorboard" / "old").exists() and (out / "metrics.jsonl").read_text() != "{}\n"  # the new run's
    with pytest.raises(ValueError, match="--resume and --overwrite exclude each other"):
        main(_sft_command(model_dir, sft_file, cache, out, "--overwrite", "--resume"))


def test_overwrite_clears_only_a_run_and_never_the_runs_inputs(model_dir, sft_file, cache, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty .*notes.txt.* and holds no hybrid-engine run"):
        main(_sft_command(model_dir, sft_file, cache, mine, "--overwrite"))
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match=r"^--model .* lies in --output"):
        main(_sft_command(model_dir, sft_file, cache, model_dir, "--overwrite"))
    with pytest.raises(ValueError, match=r"^--data .* lies in --output"):
        main(_sft_command(model_dir, sft_file, cache, sft_file.parent, "--overwrite"))
    assert (model_dir / "config.json").is_file() and sft_file.is_file()


def test_a_folder_another_live_run_holds_is_refused(model_dir, sft_file, cache, tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "out"
        out.mkdir()
        (out / LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename}))
        with pytest.raises(ValueError, match=rf"^--output {out} is in use by another run \(pid {other.pid}\)"):
            main(_sft_command(model_dir, sft_file, cache, out))
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == other.pid  # still theirs
        assert not (out / "config.json").exists()
    finally:
        other.kill()
        other.wait()


def test_a_lock_whose_run_is_gone_is_taken_over_with_a_note(model_dir, sft_file, cache, tmp_path, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    assert main(_sft_command(model_dir, sft_file, cache, out)) == 0
    assert f"was left by a run that is no longer running (pid {pid}); taking it over" in capsys.readouterr().err
    assert (out / "config.json").is_file() and not (out / LOCK_FILE).exists()


TINY_TRAIN = [f"--set={k}" for k in ("sft.max_steps=2", "sft.checkpoint_every=1", "sft.eval_every=0",
                                     "reward.max_steps=2", "reward.checkpoint_every=1", "ppo.max_steps=2",
                                     "ppo.checkpoint_every=1", "ppo.batch_size=4", "ppo.train_batch_size=4",
                                     "ppo.max_new_tokens=4", "ppo.eval_every=0", "ppo.eval_batch_size=64")]


@pytest.mark.slow
def test_train_twice_refuses_and_resume_and_overwrite_work(cache, tmp_path, capsys):
    out = tmp_path / "train"
    args = ["train", "--output", str(out), "--cache-dir", cache, "--no-progress", "--eval-fraction", "0.02",
            *TINY_TRAIN]
    assert main(args) == 0
    with pytest.raises(ValueError, match=rf"^--output {out} already holds a run \(.*ppo.*\): pass --overwrite"):
        main(args)
    assert main([*args, "--resume"]) == 0  # sft and reward finished; ppo continues from its checkpoint
    assert main([*args, "--overwrite"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sft"]["steps"] == summary["reward"]["steps"] == summary["ppo"]["steps"] == 2
    capsys.readouterr()


# -- 21: an output that cannot hold the model -------------------------------------------------------------------


def test_an_output_that_is_a_file_or_unwritable_fails_before_training(model_dir, sft_file, cache, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match=r"^--output .*a-file is a file, not a folder"):
        main(_sft_command(model_dir, sft_file, cache, target))
    with pytest.raises(ValueError, match=r"^--output .*a-file/model is not writable"):
        main(_sft_command(model_dir, sft_file, cache, target / "model"))
    assert "data " not in capsys.readouterr().out  # refused before the data was read
    with pytest.raises(ValueError, match=r"output folder .*a-file is a file"):
        _sft(cache, target)
    with pytest.raises(ValueError, match=r"output folder .*a-file/model is not writable"):
        _sft(cache, target / "model")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_fails_before_training(model_dir, sft_file, cache, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            main(_sft_command(model_dir, sft_file, cache, out))
    finally:
        out.chmod(0o755)


def test_a_failed_final_save_leaves_no_half_model_and_names_the_checkpoint(cache, tmp_path, monkeypatch):
    def full_disk(self, directory, merged=True):
        Path(directory, "config.json").write_text("{}")  # what save_pretrained writes first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(HybridEngine, "save_pretrained", full_disk)
    with pytest.raises(OSError, match=rf"saving the trained model to {tmp_path} failed \(No space left on device\); "
                                      rf"none of it was left there; the newest checkpoint, {tmp_path}/checkpoints/"
                                      r"step-4, is kept"):
        _sft(cache, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    assert [p.name for p in checkpoints(tmp_path)] == ["step-2", "step-4"]
    monkeypatch.undo()
    resumed = _sft(cache, tmp_path, resume=True)  # and the run finishes from it
    assert resumed.steps == 6 and (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()


def test_the_final_model_replaces_an_earlier_one_whole(cache, tmp_path):
    _sft(cache, tmp_path, checkpoint_every=0, max_steps=2)
    first = (tmp_path / "model.safetensors").read_bytes()
    _sft(cache, tmp_path, resume=False, checkpoint_every=0, max_steps=3)
    assert (tmp_path / "model.safetensors").read_bytes() != first and not (tmp_path / FINAL_TMP).exists()


# -- 24: checksums ----------------------------------------------------------------------------------------------


def _edit_step(folder: Path) -> None:
    state = json.loads((folder / "state.json").read_text())
    state["step"] = 5
    (folder / "state.json").write_text(json.dumps(state) + "\n")


def _truncate_losses(folder: Path) -> None:
    state = json.loads((folder / "state.json").read_text())
    state["losses"] = state["losses"][:2]
    (folder / "state.json").write_text(json.dumps(state) + "\n")


def _flip_bytes(folder: Path) -> None:
    path = folder / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    data[len(data) // 2 + 1] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate_tensors(folder: Path) -> None:
    path = folder / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def whole(cache):
    return _sft(cache, Path(cache).parent / "whole-run")


@pytest.mark.parametrize("damage, why", [
    (_edit_step, "state.json does not match its SHA-256 checksum"),
    (_truncate_losses, r"state.json has \d+ bytes, not the \d+ written"),
    (_flip_bytes, "tensors.safetensors does not match its SHA-256 checksum"),
    (_truncate_tensors, r"tensors.safetensors has \d+ bytes, not the \d+ written"),
])
def test_a_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_used(damage, why, whole, cache, tmp_path,
                                                                            capsys):
    _sft(cache, tmp_path)
    assert sorted(p.name for p in checkpoints(tmp_path)[-1].iterdir()) == [MANIFEST, "state.json",
                                                                           "tensors.safetensors"]
    damage(tmp_path / "checkpoints" / "step-4")
    with pytest.raises(ValueError, match="checkpoint .*step-4 is damaged: "):
        load_checkpoint(tmp_path / "checkpoints" / "step-4")  # named, not passed over
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).unlink()  # as if killed before the end
    resumed = _sft(cache, tmp_path, resume=True)
    err = capsys.readouterr().err
    assert f"note: checkpoint {tmp_path}/checkpoints/step-4 is damaged (" in err
    assert f"resuming from {tmp_path}/checkpoints/step-2, the newest intact one" in err
    assert re.search(why, err)
    assert resumed.losses == whole.losses and resumed.evals == whole.evals


def test_every_checkpoint_damaged_is_a_clear_error(cache, tmp_path):
    _sft(cache, tmp_path)
    for folder in checkpoints(tmp_path):
        _truncate_tensors(folder)
    with pytest.raises(ValueError, match=r"every checkpoint under .* is damaged: step-4: tensors.safetensors has"):
        _sft(cache, tmp_path, resume=True)


def test_checkpoints_without_checksums_still_resume_with_a_note(whole, cache, tmp_path, capsys):
    _sft(cache, tmp_path)
    for folder in checkpoints(tmp_path):
        (folder / MANIFEST).unlink()  # as an earlier version wrote them
    _truncate_tensors(tmp_path / "checkpoints" / "step-4")  # found on reading: named, not a bare SafetensorError
    resumed = _sft(cache, tmp_path, resume=True)
    err = capsys.readouterr().err
    assert "has no checksums (written by an earlier version): it is read unchecked" in err
    assert f"checkpoint {tmp_path}/checkpoints/step-4 is damaged (unreadable (SafetensorError" in err
    assert resumed.losses == whole.losses


def test_the_ppo_command_resumes_its_metrics_from_the_checkpoint_it_uses(tmp_path):
    from hybrid_engine.commands.ppo import resume_step

    tensors = {"x": torch.zeros(2)}
    for step in (2, 4):
        save_checkpoint(tmp_path, step, tensors, {}, keep=2)
    _truncate_tensors(tmp_path / "checkpoints" / "step-4")
    assert resume_step(str(tmp_path)) == 2
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="^--resume: no checkpoint to resume from"):
        resume_step(str(tmp_path))


# -- 23: a resume continues the same run ------------------------------------------------------------------------


def test_resume_refuses_other_data_or_another_starting_model_by_name(cache, tmp_path, capsys):
    _sft(cache, tmp_path)
    data = demo_rows("sft", 60, 8, cache)  # other rows
    config = SFTConfig(max_steps=6, batch_size=4, lr=1e-3, eval_every=2, checkpoint_every=2, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^the checkpoint was written by another run \(other training and "
                                         r"held-out rows \(--data, --data-split, --eval-fraction\)\): resume with"):
        train_sft(demo_llama(), tokenizer(), data, config, progress=False, resume=True)
    with pytest.raises(ValueError, match=r"^the checkpoint was written by another run \(other starting model "
                                         r"\(--model\)\)"):
        train_sft(demo_llama(seed=1), tokenizer(), demo_rows("sft", 64, 8, cache), config, progress=False,
                  resume=True)
    resumed = _sft(cache, tmp_path, resume=True, max_steps=8)  # the step count may change
    assert resumed.steps == 8
    assert "note: resuming with max_steps 8 (the checkpoint's run had 6)" in capsys.readouterr().err


def test_checkpoints_that_recorded_no_run_still_resume_with_a_note(whole, cache, tmp_path, capsys):
    _sft(cache, tmp_path)
    for folder in checkpoints(tmp_path):  # as an earlier version wrote them
        state = json.loads((folder / "state.json").read_text())
        del state["run"]
        (folder / "state.json").write_text(json.dumps(state) + "\n")
        (folder / MANIFEST).unlink()
    assert _sft(cache, tmp_path, resume=True).losses == whole.losses
    assert "before runs recorded their data and models: they are not compared" in capsys.readouterr().err


def test_ppo_resume_refuses_another_reward_model_or_an_added_reward_function(cache, tmp_path):
    from hybrid_engine.rlhf import RewardModel
    from hybrid_engine.rlhf.demo import rule_score_batch
    from hybrid_engine.rlhf.ppo import ModelSources, PPOConfig, train_ppo

    data = demo_rows("ppo", 32, 4, cache)
    config = PPOConfig(max_steps=3, batch_size=4, train_batch_size=4, max_new_tokens=4, checkpoint_every=2,
                       output_dir=str(tmp_path))

    def run(reward_seed=2, reward_fn=None, reference=None):
        sources = ModelSources(actor=demo_llama(), reward_model=RewardModel.from_model(demo_llama(reward_seed)),
                               reward_fn=reward_fn, reference=reference)
        return train_ppo(sources, tokenizer(), data, config, progress=False, resume=bool(checkpoints(tmp_path)))

    run()
    with pytest.raises(ValueError, match=r"\(other reward model \(--reward-model\)\): resume with"):
        run(reward_seed=3)
    with pytest.raises(ValueError, match=r"\(other reward function \(--reward-fn\)\): resume with"):
        run(reward_fn=rule_score_batch)
    with pytest.raises(ValueError, match=r"other KL reference \(--reference, by default --model\)"):
        run(reference=demo_llama(seed=5))
    assert run().steps == 3
