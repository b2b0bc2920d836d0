"""Which DeepSpeed config the frozen models are partitioned under (engine/frozen.py, rlhf/ppo/models.py), without
launching ranks; test_frozen_distributed.py partitions them on 2."""

from __future__ import annotations

from hybrid_engine.engine.frozen import eval_config
from hybrid_engine.engine.training import load_ds_config
from hybrid_engine.rlhf.ppo import PPOConfig
from hybrid_engine.rlhf.ppo.models import frozen_partition_config


def test_the_eval_config_is_stage_3_without_optimizer_offload_or_mixed_precision():
    training = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 7,
                                      "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}, "bf16": {"enabled": True},
                "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0}
    assert eval_config(training) == {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 2**62,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 7, "offload_param": {"device": "cpu"}}}


def test_the_frozen_models_are_partitioned_under_zero_3_only_and_unless_turned_off():
    zero = {stage: load_ds_config({"zero_optimization": {"stage": stage}}) for stage in range(4)}
    assert frozen_partition_config(zero[3], PPOConfig()) is zero[3]
    assert frozen_partition_config(zero[3], PPOConfig(partition_frozen=False)) is None
    assert all(frozen_partition_config(zero[s], PPOConfig()) is None for s in range(3))
    assert frozen_partition_config(None, PPOConfig()) is None
