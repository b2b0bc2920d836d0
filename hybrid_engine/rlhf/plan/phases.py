"""The plan: per phase of the pipeline (SFT, reward model training, PPO's generation, PPO's training), the bytes
each rank holds, part by part, and whether they fit the device."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_engine.rlhf.plan import memory as m
from hybrid_engine.rlhf.plan.config import PlanConfig
from hybrid_engine.rlhf.plan.memory import Trained
from hybrid_engine.rlhf.plan.shapes import ModelShape, model_shape

GIB = 2**30


@dataclass(frozen=True)
class Row:
    model: str
    """Whose: actor, critic, reference or reward."""
    part: str
    bytes: int


@dataclass(frozen=True)
class Phase:
    name: str
    rows: tuple[Row, ...]
    capacity: int

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def actor_total(self) -> int:
        return sum(r.bytes for r in self.rows if r.model == "actor")

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


@dataclass(frozen=True)
class Plan:
    config: PlanConfig
    params: dict[str, int]
    """The models' weights: actor, critic (the reward model's size), trainable (the actor's trained weights)."""
    phases: tuple[Phase, ...]

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.phases)

    def verdict(self) -> str:
        """One line: fits, or which phases do not and by how much."""
        over = [p for p in self.phases if not p.fits]
        peak = max(self.phases, key=lambda p: p.total)
        if not over:
            return (f"fits: the largest phase ({peak.name}) needs {peak.total / GIB:.1f} of "
                    f"{self.config.device_memory_gib:g} GiB per rank")
        return "does not fit: " + "; ".join(f"{p.name} needs {p.total / GIB:.1f} GiB, "
                                            f"{(p.total - p.capacity) / GIB:.1f} GiB over" for p in over)


def state(model: Trained, c: PlanConfig, who: str, resident: bool = False) -> list[Row]:
    """A trained model's weights, optimizer state, gradients and DeepSpeed buffers: at a step's peak, or (resident)
    what stays allocated between steps."""
    rows = [Row(who, "weights", m.weights(model, c)), Row(who, "optimizer state", m.optimizer(model, c)),
            Row(who, "gradients kept", m.resident_gradients(model, c)),
            Row(who, "DeepSpeed buffers", m.buffers(model, c, resident))]
    return [r for r in rows if r.bytes]


def step(model: Trained, c: PlanConfig, who: str, sequences: int, tokens: int) -> list[Row]:
    """A training step's peak: the state, and the activations or, after them, the whole gradients (ZeRO 0-1)."""
    in_flight = m.gradients_in_flight(model, c)
    peak = max(m.activations(model, c, sequences, tokens), in_flight)
    return [*state(model, c, who), Row(who, "activations / gradients in flight", peak)]


def frozen(shape: ModelShape, c: PlanConfig, who: str) -> list[Row]:
    return [Row(who, "weights (frozen)", m.frozen(shape, c))]


def plan(c: PlanConfig) -> Plan:
    """Per-rank memory of every phase of the run `c` describes."""
    actor_shape = model_shape(c.model)
    critic_shape = (actor_shape if c.critic_model is None else model_shape(c.critic_model)).as_reward_model()
    actor = Trained(actor_shape, c.lora_r, c.lora_targets)
    critic = Trained(critic_shape)
    tokens, B = c.prompt_len + c.response_len, c.batch_size
    cap = int(c.device_memory_gib * GIB)
    others = [*frozen(actor_shape, c, "reference"), *frozen(critic_shape, c, "reward")]
    critic_state = state(critic, c, "critic", resident=True) if c.algo == "ppo" else []
    generation = [*state(actor, c, "actor", resident=True),
                  Row("actor", "generation weights", m.generation_weights(actor, c)),
                  Row("actor", "KV cache", m.kv_cache(actor_shape, c)),
                  Row("actor", "prefill and logits", m.prefill(actor_shape, c)), *critic_state, *others]
    actor_step, critic_step = step(actor, c, "actor", B, tokens), step(critic, c, "critic", B, tokens)
    if c.algo == "ppo":  # the actor's step, then the critic's: the larger of their transients at once
        actor_step = [*actor_step[:-1], Row("actor/critic", "activations / gradients in flight",
                                            max(actor_step[-1].bytes, critic_step[-1].bytes))]
        critic_step = critic_step[:-1]
    ppo = [*actor_step, *(critic_step if c.algo == "ppo" else []), *others]
    phases = (Phase("sft", tuple(step(actor, c, "actor", B, tokens)), cap),
              Phase("reward", tuple(step(Trained(critic_shape), c, "reward", 2 * B, tokens)), cap),
              Phase("generation", tuple(r for r in generation if r.bytes), cap),
              Phase("ppo training", tuple(ppo), cap))
    params = {"actor": actor_shape.params, "critic": critic_shape.params, "trainable": actor.trainable}
    return Plan(c, params, phases)
