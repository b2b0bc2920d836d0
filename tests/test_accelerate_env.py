"""accelerate launch's DeepSpeed settings become the DeepSpeed config a command trains under (commands/
accelerate_env.py): from the environment accelerate's own launch code makes of an accelerate config file
(accelerate_launch.py), with no process started. The run itself under accelerate launch is in
test_cli_distributed.py."""

from __future__ import annotations

import json

import pytest
from accelerate_launch import launch_env, write_config

from hybrid_engine.commands.accelerate_env import accelerate_ds_config, launch_ds_config
from hybrid_engine.commands.common import step_config
from hybrid_engine.commands.main import build_parser
from hybrid_engine.commands.train import step_configs
from hybrid_engine.rlhf import SFTConfig

ZERO2_LINE = "ZeRO-2, gradient accumulation 1, no offload, mixed precision no"


def env_of(tmp_path, *flags: str, **changes) -> dict[str, str]:
    return launch_env(write_config(tmp_path / "accelerate.yaml", **changes), *flags)


def deepspeed(**fields) -> dict:
    """A deepspeed_config block of an accelerate config: ZeRO-2 without offload, as accelerate config writes it,
    with `fields` changed."""
    return {"zero_stage": 2, "gradient_accumulation_steps": 1, "offload_optimizer_device": "none",
            "offload_param_device": "none", "zero3_init_flag": False, **fields}


def test_zero2_of_an_accelerate_config_is_zero2(tmp_path):
    env = env_of(tmp_path)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert accelerate_ds_config(env) == ({"zero_optimization": {"stage": 2}},
                                         ZERO2_LINE)


def test_zero3_with_offload_bf16_clipping_and_the_16bit_save(tmp_path):
    block = deepspeed(zero_stage=3, offload_optimizer_device="cpu", offload_param_device="cpu",
                      zero3_save_16bit_model=True, gradient_clipping=1.0)
    config, line = accelerate_ds_config(env_of(tmp_path, deepspeed_config=block, mixed_precision="bf16"))
    assert config == {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                            "offload_param": {"device": "cpu"},
                                            "stage3_gather_16bit_weights_on_model_save": True},
                      "zero_force_ds_cpu_optimizer": False,
                      "bf16": {"enabled": True}, "gradient_clipping": 1.0}
    assert line == ("ZeRO-3, gradient accumulation 1, optimizer and parameters offloaded to the CPU, mixed precision "
                    "bf16, gradient clipping 1")


def test_fp16_and_the_launch_flags_override_the_file(tmp_path):
    config, line = accelerate_ds_config(env_of(tmp_path, "--zero_stage", "1", "--mixed_precision", "fp16"))
    assert config == {"zero_optimization": {"stage": 1}, "fp16": {"enabled": True}}
    assert line == "ZeRO-1, gradient accumulation 1, no offload, mixed precision fp16"


def test_an_empty_deepspeed_block_is_accelerates_default_zero2():
    assert accelerate_ds_config({"ACCELERATE_USE_DEEPSPEED": "true"}) == (
        {"zero_optimization": {"stage": 2}}, ZERO2_LINE)


def test_a_deepspeed_config_file_is_passed_as_it_is(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    env = env_of(tmp_path, deepspeed_config={"deepspeed_config_file": str(path), "zero3_init_flag": False})
    assert accelerate_ds_config(env) == (str(path), f"the DeepSpeed config file {path}")


@pytest.mark.parametrize("changes, flags", [
    ({"distributed_type": "MULTI_GPU", "deepspeed_config": None}, ()),
    ({"distributed_type": "MULTI_CPU", "deepspeed_config": None, "use_cpu": True}, ()),
    ({}, ("--cpu",)),  # accelerate launch --cpu runs one process, without DeepSpeed
], ids=["multi-gpu", "multi-cpu", "--cpu"])
def test_without_deepspeed_the_command_runs_as_under_torchrun(tmp_path, changes, flags):
    assert accelerate_ds_config(env_of(tmp_path, *flags, **changes)) is None
    assert launch_ds_config(None, "--ds-config", env_of(tmp_path, *flags, **changes)) == (None, None)
    assert accelerate_ds_config({}) is None  # not started by accelerate launch


@pytest.mark.parametrize("changes, error", [
    ({"deepspeed_config": deepspeed(gradient_accumulation_steps=0)},
     "accelerate launch's gradient_accumulation_steps must be a positive integer or auto, got '0'"),
    ({"deepspeed_config": deepspeed(offload_optimizer_device="nvme")},
     "accelerate launch's offload_optimizer_device nvme is not supported (accelerate launch does not pass its nvme "
     "path): use cpu, or a deepspeed_config_file with the offload section and its nvme_path"),
    ({"deepspeed_config": deepspeed(offload_param_device="cpu")},
     "accelerate launch's offload_param_device cpu needs zero_stage 3, got 2"),
    ({"deepspeed_config": deepspeed(zero_stage=3, zero3_init_flag=True)},
     "accelerate launch's zero3_init_flag true (building the model under deepspeed.zero.Init) is not supported: set "
     "it to false; ZeRO-3 still partitions the model when training starts"),
    ({"deepspeed_config": deepspeed(deepspeed_moe_layer_cls_names="MixtralSparseMoeBlock")},
     "accelerate launch's deepspeed_moe_layer_cls_names is not supported: remove it"),
    ({"deepspeed_config": deepspeed(zero_stage=4)}, "accelerate launch's zero_stage must be 0, 1, 2 or 3, got '4'"),
    ({"distributed_type": "MULTI_GPU", "deepspeed_config": None, "mixed_precision": "bf16"},
     "accelerate launch's mixed_precision bf16 is applied only through DeepSpeed here: use distributed_type "
     "DEEPSPEED (or --ds-config with a bf16/fp16 section), or mixed_precision no"),
    ({"distributed_type": "FSDP", "deepspeed_config": None},
     "accelerate launch with distributed_type FSDP is not supported: use DEEPSPEED (its ZeRO-3 shards the model as "
     "FSDP does), MULTI_GPU, or torchrun"),
], ids=["accumulation", "nvme", "param-offload-zero2", "zero3-init", "moe", "stage-4", "bf16-no-deepspeed",
        "fsdp"])
def test_a_setting_the_commands_cannot_honour_is_refused_by_name(tmp_path, changes, error):
    env = env_of(tmp_path, **changes)
    with pytest.raises(ValueError) as caught:
        accelerate_ds_config(env)
    assert str(caught.value) == error


def test_fp8_is_refused(tmp_path):  # accelerate launch itself refuses fp8 where neither TE nor torchao is
    env = {**env_of(tmp_path), "ACCELERATE_MIXED_PRECISION": "fp8"}
    with pytest.raises(ValueError, match="^accelerate launch's mixed_precision 'fp8' is not supported with DeepSpeed: "
                       "use no, bf16 or fp16$"):
        accelerate_ds_config(env)


def test_a_deepspeed_config_file_beside_other_settings_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{}")
    env = env_of(tmp_path, deepspeed_config={"deepspeed_config_file": str(path), "zero_stage": 3},
                 mixed_precision="bf16")
    with pytest.raises(ValueError, match=rf"^accelerate launch's deepspeed_config_file {path} comes with zero_stage, "
                       "mixed_precision: put those settings in the file and remove them from the accelerate config$"):
        accelerate_ds_config(env)
    env = env_of(tmp_path, deepspeed_config={"deepspeed_config_file": str(tmp_path / "no.json")})
    with pytest.raises(ValueError, match="^accelerate launch's deepspeed_config_file: no such file "):
        accelerate_ds_config(env)


def test_a_given_ds_config_wins_with_a_note_naming_both(tmp_path):
    env = env_of(tmp_path, deepspeed_config=deepspeed(zero3_init_flag=True))  # not checked: it is not used
    config, note = launch_ds_config("z3.json", "--ds-config", env)
    assert config == "z3.json"
    assert note == ("note: --ds-config z3.json wins over the DeepSpeed settings of accelerate launch (zero_stage=2, "
                    "gradient_accumulation_steps=1, offload_optimizer_device=none, offload_param_device=none, "
                    "zero3_init_flag=true, mixed_precision=no)")
    assert launch_ds_config("z3.json", "--ds-config", {}) == ("z3.json", None)


def test_the_commands_train_under_accelerates_settings_and_say_so(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    for name, value in env_of(tmp_path).items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["sft", "--demo"])
    step_config(args, SFTConfig, "sft")
    assert args.ds_config == {"zero_optimization": {"stage": 2}}
    assert capsys.readouterr().out == f"DeepSpeed settings from accelerate launch: {ZERO2_LINE}\n"
    args = build_parser().parse_args(["train", "--demo", "--output", str(tmp_path / "out")])
    step_configs(args)
    assert args.ds_config["zero_optimization"] == {"stage": 2}
    (tmp_path / "z3.json").write_text("{}")
    (tmp_path / "run.yaml").write_text(f"ds_config: {tmp_path / 'z3.json'}\n")
    args = build_parser().parse_args(["sft", "--demo", "--config", str(tmp_path / "run.yaml")])
    step_config(args, SFTConfig, "sft")
    assert args.ds_config == str(tmp_path / "z3.json")
    assert capsys.readouterr().err.startswith(f"note: ds_config of {tmp_path / 'run.yaml'} {tmp_path / 'z3.json'} "
                                              "wins over the DeepSpeed settings of accelerate launch (zero_stage=2,")


def test_accelerates_gradient_accumulation_is_the_deepspeed_configs(tmp_path):
    """Its default, 1 (written by accelerate config), leaves the steps their own; another is theirs unless given."""
    config, line = accelerate_ds_config(env_of(tmp_path, deepspeed_config=deepspeed(gradient_accumulation_steps=4)))
    assert config == {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}
    assert line == "ZeRO-2, gradient accumulation 4, no offload, mixed precision no"
