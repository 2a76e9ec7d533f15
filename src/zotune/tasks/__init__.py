"""Tasks: data sources, prompt templates and answers -> batches, a loss and metrics.

Tasks know models only through a tokenizer and forward calls; they know no optimizer.
"""

from zotune.tasks.base import Task, TaskConfig
from zotune.tasks.choice import MultipleChoiceTask
from zotune.tasks.classification import Batch, ClassificationTask
from zotune.tasks.files import load_task_file
from zotune.tasks.generation import GenerationTask
from zotune.tasks.sources import Table, load_rows
from zotune.tasks.suite import SUITE

TASK_TYPES = {"classification": ClassificationTask, "multiple_choice": MultipleChoiceTask, "generation": GenerationTask}


def load_tables(cfg: TaskConfig) -> dict[str, Table]:
    """The rows `cfg` names: {"data": rows} (split by the task), or {"train": ..., "dev": ..., "test": ...}
    for the splits given as sources of their own."""
    roles = {role: getattr(cfg, role) for role in ("train", "dev", "test") if getattr(cfg, role)}
    if "train" not in roles:
        roles = {"data": cfg.data, **roles}
    return {role: load_rows(source, f"task.{role}") for role, source in roles.items()}


def make_task(cfg: TaskConfig, tokenizer, table: Table | dict[str, Table] | None = None) -> Task:
    """The task `cfg` describes, over `table` (default: the rows `cfg` names, `load_tables`)."""
    return TASK_TYPES[cfg.type](cfg, tokenizer, table if table is not None else load_tables(cfg))


__all__ = ["Batch", "ClassificationTask", "GenerationTask", "MultipleChoiceTask", "SUITE", "TASK_TYPES", "Table",
           "Task", "TaskConfig", "load_rows", "load_tables", "load_task_file", "make_task"]
