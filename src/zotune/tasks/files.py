"""Task files: a user's own task in YAML or Python (`--task my_task.yaml`), as the TaskConfig options it sets."""

from __future__ import annotations

from pathlib import Path

from zotune.config import ConfigError, yaml_load
from zotune.tasks.base import TaskConfig
from zotune.tasks.suite import SUITE


def load_task_file(path: str) -> dict:
    """The task options a YAML file (a mapping of TaskConfig options) or a Python file (a dict `TASK`)
    sets. In a Python file, `prepare` and `objective` may be functions of that file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"task file {path} does not exist; pass a suite task name ({', '.join(SUITE)}) "
                          "or a .yaml / .py file")
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            node = yaml.compose(file.read_text(encoding="utf-8"))
            values = yaml_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"task file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"task file {path} must be a mapping of task options (template: ..., data: ...)")
        lines = {key.value: key.start_mark.line + 1 for key, _ in node.value} if node is not None else {}
    elif file.suffix == ".py":
        values, lines = _python_task(file), {}
    else:
        raise ConfigError(f"task file {path}: use a .yaml or a .py file")
    known = TaskConfig.__dataclass_fields__
    for key in values:
        if key not in known:
            where = f"{path}:{lines[key]}" if key in lines else path
            raise ConfigError(f"{where}: unknown task option {key!r}; task options are {', '.join(known)}")
    return values


def _python_task(file: Path) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"zotune_task_{abs(hash(str(file)))}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error, with its name
        raise ConfigError(f"task file {file} failed to run ({type(e).__name__}: {e})") from None
    values = getattr(module, "TASK", None)
    if not isinstance(values, dict):
        raise ConfigError(f"task file {file} must define TASK = dict(template=..., data=..., ...)")
    values = dict(values)
    for key in ("prepare", "objective"):
        if callable(values.get(key)):  # a function of this file, recorded by name so a run folder can find it again
            values[key] = f"{file.resolve()}:{values[key].__name__}"
    return values
