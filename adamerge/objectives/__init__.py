"""Objectives: what the merge coefficients are optimized for, one small module each."""

from adamerge.objectives.align import Align
from adamerge.objectives.base import Objective
from adamerge.objectives.ce import CrossEntropy
from adamerge.objectives.dam import Dam
from adamerge.objectives.entropy import Entropy
from adamerge.objectives.projected import Projected
from adamerge.objectives.wudi import Wudi

OBJECTIVES: dict[str, type[Objective]] = {
    "entropy": Entropy,
    "align": Align,
    "dam": Dam,
    "ce": CrossEntropy,
    "projected": Projected,
    "wudi": Wudi,
}

__all__ = ["OBJECTIVES", "Align", "CrossEntropy", "Dam", "Entropy", "Objective", "Projected", "Wudi"]
