"""The offline expert zoo behind the embedded default: tiny Llama experts on synthetic tasks.

``build_zoo()`` trains it in-process (about a minute on 2 CPU cores) and caches it; see ``build.py``.
"""

from adamerge.zoo.build import Zoo, build_zoo, default_root
from adamerge.zoo.recipe import ZooSettings
from adamerge.zoo.tasks import EXPERT_TASKS, GENERIC_TASKS, Task, make_splits

__all__ = ["EXPERT_TASKS", "GENERIC_TASKS", "Task", "Zoo", "ZooSettings", "build_zoo", "default_root", "make_splits"]
