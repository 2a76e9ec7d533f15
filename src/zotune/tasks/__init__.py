"""Tasks: data sources, prompt templates and verbalizers -> batches, a loss and a metric.

Tasks know models only through a tokenizer and a forward call; they know no optimizer.
"""

from zotune.tasks.classification import Batch, ClassificationTask, TaskConfig
from zotune.tasks.sources import load_examples

__all__ = ["Batch", "ClassificationTask", "TaskConfig", "load_examples"]
