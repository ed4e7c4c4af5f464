"""Worker processes for prefetch: plan (how many), wire (the JSON lines), parent, child.

Below the hub: the parent works on any :class:`HubLike`, and the child is handed
the hub class by its entry point (``asynchub._launch.worker``).
"""

from .child import MakeHub, can_fork, prefork
from .parent import Forked, HubLike, adopt, release, run
from .plan import plan_forked, plan_processes, usable_cores
from .wire import error_from_json, error_to_json

__all__ = [
    "Forked",
    "HubLike",
    "MakeHub",
    "adopt",
    "can_fork",
    "error_from_json",
    "error_to_json",
    "plan_forked",
    "plan_processes",
    "prefork",
    "release",
    "run",
    "usable_cores",
]
