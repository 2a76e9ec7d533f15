"""Tasks: data sources, prompt templates and answers -> batches, a loss and metrics.

Tasks know models only through a tokenizer and forward calls; they know no optimizer.
"""

from zotune.tasks.base import Task, TaskConfig
from zotune.tasks.choice import MultipleChoiceTask
from zotune.tasks.classification import Batch, ClassificationTask
from zotune.tasks.generation import GenerationTask
from zotune.tasks.sources import Table, load_rows
from zotune.tasks.suite import SUITE, load_task_file

TASK_TYPES = {"classification": ClassificationTask, "multiple_choice": MultipleChoiceTask, "generation": GenerationTask}


def make_task(cfg: TaskConfig, tokenizer, table: Table | None = None) -> Task:
    """The task `cfg` describes, over `table` (default: the rows of `cfg.data`)."""
    return TASK_TYPES[cfg.type](cfg, tokenizer, table if table is not None else load_rows(cfg.data))


__all__ = ["Batch", "ClassificationTask", "GenerationTask", "MultipleChoiceTask", "SUITE", "TASK_TYPES", "Table",
           "Task", "TaskConfig", "load_rows", "load_task_file", "make_task"]
