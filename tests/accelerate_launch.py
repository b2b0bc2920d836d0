"""The environment `accelerate launch --config_file FILE` gives the processes it starts, computed by accelerate's own
launch code (accelerate/commands/launch.py, accelerate/utils/launch.py) with no process started: what
hybrid_engine/commands/accelerate_env.py reads."""

from __future__ import annotations

import warnings
from pathlib import Path

import yaml
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

ZERO2 = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_machines": 1,
         "num_processes": 2, "machine_rank": 0, "mixed_precision": "no", "use_cpu": False,
         "deepspeed_config": {"zero_stage": 2, "gradient_accumulation_steps": 1, "offload_optimizer_device": "none",
                              "offload_param_device": "none", "zero3_init_flag": False}}
"""An accelerate config as `accelerate config` writes it: DeepSpeed ZeRO-2 on 2 processes."""


def write_config(path: Path, **changes) -> Path:
    """ZERO2 with `changes` (deepspeed_config=None drops that block) written as YAML to `path`."""
    config = {**ZERO2, **changes}
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    return path


def launch_env(config_file: Path | str, *flags: str) -> dict[str, str]:
    """The ACCELERATE_* variables `accelerate launch --config_file config_file *flags script.py` sets for its
    processes, as its launch_command chooses the launcher."""
    args = launch_command_parser().parse_args(["--config_file", str(config_file), *flags, "script.py"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the port-in-use notice
        args, defaults, mp_from_config = _validate_launch_command(args)
        if args.use_deepspeed and not args.cpu:
            fields = [*defaults.deepspeed_config] + (["mixed_precision"] if mp_from_config else [])
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
            env = prepare_deepspeed_cmd_env(args)[1]
        elif (args.use_fsdp or args.use_megatron_lm or args.multi_gpu) and not args.cpu:
            env = prepare_multi_gpu_env(args)
        else:
            env = prepare_simple_launcher_cmd_env(args)[1]
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}
