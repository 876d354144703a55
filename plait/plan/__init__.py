"""Plan a run before making it: a cluster profile, a cost model of every strategy, the pick.

``plait plan --model M --nproc N`` prints every candidate's predicted step time, memory per rank and
bytes per link level, and the one it picks; ``plait train --strategy auto`` trains with that pick.
"""

from plait.plan.cost import Prediction, predict
from plait.plan.planner import Plan, candidates, make_plan
from plait.plan.profile import Link, Profile, from_hardware, load
from plait.plan.workload import Candidate, Workload, workload_for

__all__ = [
    "Candidate",
    "Link",
    "Plan",
    "Prediction",
    "Profile",
    "Workload",
    "candidates",
    "from_hardware",
    "load",
    "make_plan",
    "predict",
    "workload_for",
]
