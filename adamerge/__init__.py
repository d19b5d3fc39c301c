"""adamerge: learn merge coefficients around frozen experts with gradients, then fold them into one checkpoint.

Data flows one way: ``ExpertPool`` (base + experts) -> ``TaskVectors`` (stacked ``W_k - W0``)
-> ``MergedModel`` (coefficients of a ``Granularity``) -> trainer -> ``fold`` / ``save_folded``.
"""

from adamerge.errors import AdamergeError
from adamerge.granularity import (
    Block,
    Chunk,
    Column,
    Granularity,
    Layer,
    Task,
)
from adamerge.merged import MergedModel, merge_tensor
from adamerge.pool import ExpertPool
from adamerge.taskvectors import TaskVectors
from adamerge.tensors import TensorInfo

__all__ = [
    "AdamergeError",
    "Block",
    "Chunk",
    "Column",
    "ExpertPool",
    "Granularity",
    "Layer",
    "MergedModel",
    "Task",
    "TaskVectors",
    "TensorInfo",
    "merge_tensor",
]
__version__ = "0.1.0"
