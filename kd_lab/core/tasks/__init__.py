"""Tasks (``conf/task/<name>.yaml``): what is learned and how it is measured; see ``base.Task``."""

from kd_lab.core.tasks.base import Task
from kd_lab.core.tasks.classification import Classification, cross_entropy
from kd_lab.core.tasks.language_modeling import LanguageModeling
from kd_lab.core.tasks.sequence_classification import SequenceClassification

__all__ = ["Classification", "LanguageModeling", "SequenceClassification", "Task", "cross_entropy"]
