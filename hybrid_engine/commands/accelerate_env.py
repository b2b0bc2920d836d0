"""The DeepSpeed config a command trains under when `accelerate launch` started it: read from the environment
accelerate sets for its processes, never by building an Accelerator.

With `distributed_type: DEEPSPEED`, accelerate launch starts the processes through torchrun and passes its config's
`deepspeed_config` block as ACCELERATE_* variables (accelerate/utils/launch.py, prepare_deepspeed_cmd_env). Here
they become the DeepSpeed config dict the library takes, as accelerate's DeepSpeedPlugin builds it: zero_stage
(default 2), offload_optimizer_device and offload_param_device (none or cpu), gradient_accumulation_steps (1: the
steps' own; another: theirs unless given to them),
gradient_clipping, zero3_save_16bit_model and mixed_precision (no, bf16, fp16); or, with deepspeed_config_file, that
file as it is. A setting the commands cannot honour is refused by name, never dropped. Under accelerate's other
distributed types the command runs as under torchrun, without DeepSpeed.

This reads a launcher's settings for the command line, as the flags and --config are read; the library
(hybrid_engine.rlhf) takes a ds_config and knows no launcher.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

NAMES = {  # accelerate's config key -> the variable accelerate launch sets for it
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
    "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
    "deepspeed_config_file": "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "deepspeed_moe_layer_cls_names": "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES",
    "mixed_precision": "ACCELERATE_MIXED_PRECISION",
}
OTHER_TYPES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_MEGATRON_LM": "MEGATRON_LM"}
WHERE = "accelerate launch's"


def _is_true(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


def uses_deepspeed(env: Mapping[str, str]) -> bool:
    """Whether accelerate launch started this process with distributed_type DEEPSPEED."""
    return _is_true(env.get("ACCELERATE_USE_DEEPSPEED", ""))


def given_settings(env: Mapping[str, str]) -> dict[str, str]:
    """{accelerate config key: value} of the settings accelerate launch passed that bear on DeepSpeed: the DeepSpeed
    block's under DEEPSPEED, else a mixed_precision other than 'no' (which only DeepSpeed could apply here)."""
    if uses_deepspeed(env):
        return {key: env[name] for key, name in NAMES.items() if name in env}
    precision = env.get(NAMES["mixed_precision"], "no").lower()
    return {} if precision == "no" else {"mixed_precision": precision}


def check_distributed_type(env: Mapping[str, str]) -> None:
    """Refuses the distributed types the commands do not run under (FSDP, Megatron-LM) by name."""
    for name, kind in OTHER_TYPES.items():
        if _is_true(env.get(name, "")):
            raise ValueError(f"accelerate launch with distributed_type {kind} is not supported: use DEEPSPEED (its "
                             "ZeRO-3 shards the model as FSDP does), MULTI_GPU, or torchrun")


def _stage(value: str) -> int:
    if value.strip() not in ("0", "1", "2", "3"):
        raise ValueError(f"{WHERE} zero_stage must be 0, 1, 2 or 3, got {value!r}")
    return int(value)


def _offload(key: str, value: str, stage: int, stages: tuple[int, ...]) -> bool:
    """Whether `key` (offload_optimizer_device or offload_param_device) offloads to the CPU; nvme is refused."""
    device = value.strip().lower()
    if device not in ("none", "cpu", "nvme"):
        raise ValueError(f"{WHERE} {key} must be none, cpu or nvme, got {value!r}")
    if device == "nvme":
        raise ValueError(f"{WHERE} {key} nvme is not supported (accelerate launch does not pass its nvme path): "
                         "use cpu, or a deepspeed_config_file with the offload section and its nvme_path")
    if device == "cpu" and stage not in stages:
        raise ValueError(f"{WHERE} {key} cpu needs zero_stage {' or '.join(map(str, stages))}, got {stage}")
    return device == "cpu"


def _precision(value: str) -> str:
    precision = value.strip().lower()
    if precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"{WHERE} mixed_precision {value!r} is not supported with DeepSpeed: use no, bf16 or fp16")
    return precision


def _accumulation(value: str) -> int | None:
    """accelerate's gradient_accumulation_steps as a number; None for "auto" (the step config's)."""
    if value.strip() == "auto":
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{WHERE} gradient_accumulation_steps must be a positive integer or auto, got {value!r}")
    return int(value)


def _clipping(value: str) -> float | None:
    if value.strip().lower() in ("auto", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{WHERE} gradient_clipping must be a number, got {value!r}") from None


def _refuse_unsupported(settings: Mapping[str, str]) -> None:
    if _is_true(settings.get("zero3_init_flag", "false")):
        raise ValueError(f"{WHERE} zero3_init_flag true (building the model under deepspeed.zero.Init) is not "
                         "supported: set it to false; ZeRO-3 still partitions the model when training starts")
    if settings.get("deepspeed_moe_layer_cls_names"):
        raise ValueError(f"{WHERE} deepspeed_moe_layer_cls_names is not supported: remove it")


def config_file(settings: Mapping[str, str], env: Mapping[str, str]) -> str:
    """accelerate's deepspeed_config_file, alone: the other DeepSpeed settings belong in the file (accelerate
    refuses them beside it too), and so does a mixed precision."""
    path = settings["deepspeed_config_file"]
    beside = [k for k in settings if k not in ("deepspeed_config_file", "zero3_init_flag", "mixed_precision")]
    if env.get(NAMES["mixed_precision"], "no").lower() != "no":
        beside.append("mixed_precision")
    if beside:
        raise ValueError(f"{WHERE} deepspeed_config_file {path} comes with {', '.join(beside)}: put those settings "
                         "in the file and remove them from the accelerate config")
    if not Path(path).is_file():
        raise ValueError(f"{WHERE} deepspeed_config_file: no such file {path!r}")
    return path


def built_config(settings: Mapping[str, str]) -> tuple[dict, str]:
    """(the DeepSpeed config of accelerate's deepspeed_config fields, a short description of it)."""
    stage = _stage(settings.get("zero_stage", "2"))
    accumulation = _accumulation(settings.get("gradient_accumulation_steps", "1"))
    zero: dict = {"stage": stage}
    config: dict = {"zero_optimization": zero}
    if accumulation not in (None, 1):  # the steps take it unless given (commands/ds_accumulation.py); 1, the value
        config["gradient_accumulation_steps"] = accumulation  # accelerate config writes, leaves the steps theirs
    offloaded = []
    if _offload("offload_optimizer_device", settings.get("offload_optimizer_device", "none"), stage, (1, 2, 3)):
        zero["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW steps the offloaded weights (no CPUAdam build)
        offloaded.append("optimizer")
    if _offload("offload_param_device", settings.get("offload_param_device", "none"), stage, (3,)):
        zero["offload_param"] = {"device": "cpu"}
        offloaded.append("parameters")
    if "zero3_save_16bit_model" in settings:
        zero["stage3_gather_16bit_weights_on_model_save"] = _is_true(settings["zero3_save_16bit_model"])
    precision = _precision(settings.get("mixed_precision", "no"))
    if precision != "no":
        config[precision] = {"enabled": True}
    parts = [f"ZeRO-{stage}", f"gradient accumulation {accumulation or 'auto'}",
             f"{' and '.join(offloaded)} offloaded to the CPU" if offloaded else "no offload",
             f"mixed precision {precision}"]
    clip = _clipping(settings.get("gradient_clipping", "auto"))
    if clip is not None:
        config["gradient_clipping"] = clip
        parts.append(f"gradient clipping {clip:g}")
    return config, ", ".join(parts)


def accelerate_ds_config(env: Mapping[str, str]) -> tuple[dict | str, str] | None:
    """(the DeepSpeed config accelerate launch's settings ask for: a dict, or the path of its
    deepspeed_config_file; a description) for the process environment `env`; None when accelerate launch gave no
    DeepSpeed settings. A setting the commands do not support is refused with a ValueError naming it."""
    check_distributed_type(env)
    settings = given_settings(env)
    if not uses_deepspeed(env):
        if settings:
            raise ValueError(f"{WHERE} mixed_precision {settings['mixed_precision']} is applied only through "
                             "DeepSpeed here: use distributed_type DEEPSPEED (or --ds-config with a bf16/fp16 "
                             "section), or mixed_precision no")
        return None
    _refuse_unsupported(settings)
    if settings.get("deepspeed_config_file", "none") != "none":
        path = config_file(settings, env)
        return path, f"the DeepSpeed config file {path}"
    return built_config(settings)


def launch_ds_config(given, given_as: str, env: Mapping[str, str]) -> tuple[dict | str | None, str | None]:
    """(the ds_config to train under, the line to print about it, or None). `given`: the ds_config of the flags or
    the config file (None: none), named `given_as` in the note; it wins over accelerate launch's settings, which are
    then named, not checked. Without it, accelerate launch's DeepSpeed settings (accelerate_ds_config)."""
    if given is not None:
        check_distributed_type(env)
        settings = given_settings(env)
        if not settings:
            return given, None
        named = ", ".join(f"{k}={v}" for k, v in settings.items())
        return given, f"note: {given_as} {given} wins over the DeepSpeed settings of accelerate launch ({named})"
    found = accelerate_ds_config(env)
    if found is None:
        return None, None
    config, description = found
    return config, f"DeepSpeed settings from accelerate launch: {description}"
