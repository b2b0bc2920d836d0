"""The memory planner: what each rank holds in each phase of an RLHF run, and whether it fits (`hybrid-engine plan`).
Arithmetic on the model's shape, checked against measured peaks by bench/plan_check.py."""

from hybrid_engine.rlhf.plan.config import PlanConfig
from hybrid_engine.rlhf.plan.phases import Phase, Plan, Row, plan

__all__ = ["Phase", "Plan", "PlanConfig", "Row", "plan"]
