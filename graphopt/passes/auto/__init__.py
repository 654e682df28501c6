"""The joint planner: one accuracy budget across every lossy family (graphopt.Auto), its search space
(space.py), search (search.py), pass (joint.py) and plan artifact (plan.py)."""
from .joint import ApplyPlan, JointPlan
from .options import Auto, optimize_option
from .plan import Plan

__all__ = ["ApplyPlan", "Auto", "JointPlan", "Plan", "optimize_option"]
