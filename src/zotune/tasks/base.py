"""What every task type shares: the config, prompts from rows, the fixed seeded split, batching,
the scored answer tokens, and the user functions a config names.

A task turns rows (dicts from `zotune.tasks.sources`) into examples, examples into batches, and a
batch into the value ZO minimises (`head_loss`) and into summable evaluation counts
(`evaluate_batch`, then `metrics`). The types: classification.py, choice.py, generation.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.tasks.prompts import is_blank, render, template_fields
from zotune.tasks.sources import Table
from zotune.tasks.suite import SUITE

# The metrics each type reports; the first is its headline unless `task.metric` names another.
METRICS = {"classification": ("accuracy", "f1"), "multiple_choice": ("accuracy",), "generation": ("f1", "exact_match")}


@dataclass
class TaskConfig:
    """What to learn: the data, how a row becomes a prompt (and its answer), and the fixed seeded split.

    `name` picks a task of the suite (tasks/suite.py: the MeZO set and the built-in data sets): its
    type, data, template, verbalizer, ... fill every option left at its default. The split is fixed
    by `split_seed`: the data is shuffled once, test examples come first, then dev, then train, so
    changing a size never moves an example between splits. With splits of their own (`train`,
    `dev`, `test`), a split that is given is read from its source (`n_dev` / `n_test` examples of
    it, a seeded sample; 0: all of it) and those that are not are carved from the training rows as
    above.
    """

    # a suite task: sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop, rotten_tomatoes, ...
    name: str = ""
    type: str = ""  # classification, multiple_choice or generation; "": the named task's, else classification
    # built-in name, file (.csv/.tsv/.jsonl/.json/.parquet) or hf:NAME; "": the named task's (rotten_tomatoes)
    data: str = ""
    train: str = ""  # the training rows from their own source (a file or hf:NAME[:CONFIG]@SPLIT) instead of task.data
    dev: str = ""  # the dev rows from their own source; "": carved from the training rows
    test: str = ""  # the test rows from their own source; "": carved from the training rows
    template: str = ""  # the prompt; {field}s are columns of a row; "": the named task's, else "{text} It was"
    verbalizer: dict[str, str] = field(default_factory=dict)  # classification: label -> word
    # multiple choice: one template per candidate, or ["{list column}"]
    choices: list[str] = field(default_factory=list)
    answer: str = ""  # generation: the column of the answer (a list column: every gold answer; a.b: a nested field)
    label_names: list[str] = field(default_factory=list)  # integer labels are indices into these names
    text_column: str = "text"  # the column a {text} field reads
    label_column: str = "label"
    prepare: str = ""  # a function "module:name" / "file.py:name" of a row (dict) returning the row the template reads
    n_train: int = 1000  # MeZO's setting; 0: every example not in dev or test
    k_shot: int = 0  # classification: > 0 trains on k examples of each label instead (MeZO's k = 16 or 512)
    n_dev: int = 200
    n_test: int = 500
    split_seed: int = 0
    max_length: int = 128  # tokens of prompt + answer; a longer prompt loses its beginning
    max_new_tokens: int = 32  # generation: the longest answer decoded (and trained on)
    stop: str = "\n"  # generation: an answer ends here (trained as its last token, cut when decoding)
    metric: str = ""  # the headline: accuracy or f1 (classification), accuracy (multiple choice), f1 or exact_match
    # what ZO minimises: loss, a metric (accuracy, f1, exact_match), or "module:name" / "file.py:name"
    objective: str = "loss"

    def __post_init__(self):
        self._check_sources()
        self._take_suite_defaults()
        self._check_prompt()
        self._check_sizes_and_functions()

    def _check_sources(self) -> None:
        """Where the rows come from: a suite task, task.data, or task.train / dev / test."""
        if self.name and self.name not in SUITE:
            raise ConfigError(f"task.name={self.name!r} is not a suite task; choose from {', '.join(SUITE)} "
                              f"(or give task.type, task.data and task.template for your own)")
        if self.train and self.data:
            raise ConfigError(f"task.data={self.data} and task.train={self.train} both name the training rows; give "
                              f"task.train (with task.dev / task.test) or task.data (split by zotune), not both")
        if (self.dev or self.test) and not (self.train or self.data or self.name):
            raise ConfigError("task.dev / task.test need training rows too: give task.train (or task.data)")
        for role, split in (("dev", "validation"), ("test", "test")):  # hf:NAME alone would read its train split
            source = getattr(self, role)
            if source.startswith("hf:") and "@" not in source:
                raise ConfigError(f"task.{role}={source} names no split; add it, e.g. task.{role}={source}@{split}")
        if not (self.name or self.data or self.train):
            if self.type not in ("", "classification"):
                raise ConfigError(f"task.data is needed for a {self.type} task: a file of its rows, or hf:NAME")
            self.data = "rotten_tomatoes"  # the default task

    def _take_suite_defaults(self) -> None:
        """The suite task's (or built-in data set's) options, where the user's are at their defaults."""
        named = SUITE.get(self.name or self.data)  # a built-in data set names its own task
        if named is not None and self.train:
            named = {k: v for k, v in named.items() if k != "data"}  # its prompt, over the user's own splits
        if named is not None and self.type and self.type != named.get("type", "classification"):
            if self.name:
                raise ConfigError(f"task.name={self.name} is a {named.get('type', 'classification')} task; drop "
                                  f"task.type={self.type}, or describe your own task without task.name")
            named = None  # a built-in data set read as another type of task: its prompt does not apply
        defaults = TaskConfig.__dataclass_fields__
        for key, value in (named or {}).items():
            if getattr(self, key) == _default(defaults[key]):
                setattr(self, key, value)
        self.type = self.type or "classification"
        if self.type not in METRICS:
            raise ConfigError(f"task.type={self.type!r}: choose classification, multiple_choice or generation")

    def _check_prompt(self) -> None:
        """The template and what answers it: a verbalizer, choices or an answer column."""
        if not self.template:
            if self.type != "classification":
                raise ConfigError(f"task.template is needed for a {self.type} task: the prompt, with {{column}} fields")
            self.template = "{text} It was"
        if self.type == "classification" and self.label_column in template_fields(self.template, "task.template"):
            raise ConfigError(f"task.template={self.template!r} reads the label column {{{self.label_column}}}: "
                              f"the answer would be in every prompt; read only the input columns")
        given = {"verbalizer": self.verbalizer, "choices": self.choices, "answer": self.answer}
        needed = {"classification": "verbalizer", "multiple_choice": "choices", "generation": "answer"}[self.type]
        stray = next((k for k, v in given.items() if v and k != needed), None)
        if stray:
            raise ConfigError(f"task.{stray} is not used by a {self.type} task (it takes task.{needed}); drop it or "
                              f"set task.type")
        if self.type == "classification":
            if not self.verbalizer:
                raise ConfigError(f"task.verbalizer is needed for {self.data}: map every label to a word, "
                                  f"e.g. task.verbalizer={{pos: great, neg: terrible}}")
            if len(self.verbalizer) < 2:
                raise ConfigError("task.verbalizer needs at least two labels, e.g. {fresh: great, rotten: terrible}")
            empty = [k for k, v in self.verbalizer.items() if not str(v).strip()]
            if empty:
                raise ConfigError(f"task.verbalizer gives label {empty[0]!r} an empty word; give every label a word")
        elif self.type == "multiple_choice":
            if not self.choices:
                raise ConfigError("task.choices is needed for a multiple_choice task: a template per candidate, e.g. "
                                  "['{choice1}', '{choice2}'], or ['{candidates}'] for a column holding a list")
            for i, choice in enumerate(self.choices):
                template_fields(choice, f"task.choices[{i}]", allow_constant=True)
        elif not self.answer.strip():
            raise ConfigError("task.answer is needed for a generation task: the column holding the answer")

    def _check_sizes_and_functions(self) -> None:
        """Split sizes, lengths, the metric, and the user's functions (found now, before any work)."""
        if self.k_shot and self.type != "classification":
            raise ConfigError(f"task.k_shot takes k examples of each label: a {self.type} task has "
                              "none; use task.n_train")
        self.metric = self.metric or METRICS[self.type][0]
        if self.metric not in METRICS[self.type]:
            raise ConfigError(f"task.metric={self.metric!r}: a {self.type} task reports "
                              f"{', '.join(METRICS[self.type])}")
        for name in ("n_train", "n_dev", "n_test", "k_shot"):
            if getattr(self, name) < 0:
                raise ConfigError(f"task.{name}={getattr(self, name)} must be >= 0")
        if self.n_test < 1 and not self.test:
            raise ConfigError("task.n_test must be >= 1: the metric before and after is measured on the test split "
                              "(0 means all of it only with a test file, task.test)")
        if self.max_length < 8:
            raise ConfigError(f"task.max_length={self.max_length} is too short for a prompt; use >= 8 tokens")
        if self.type == "generation" and not 1 <= self.max_new_tokens < self.max_length:
            raise ConfigError(f"task.max_new_tokens={self.max_new_tokens} must be >= 1 and below task.max_length")
        if self.prepare:
            load_function(self.prepare, "task.prepare")  # fails here, before any work, when it cannot be found
        objective_names = {"classification": ("loss", "accuracy", "f1"), "multiple_choice": ("loss", "accuracy"),
                           "generation": ("loss", "f1", "exact_match")}[self.type]
        if self.objective not in objective_names:
            if ":" not in self.objective:
                raise ConfigError(f"task.objective={self.objective!r}: a {self.type} task minimises "
                                  f"{', '.join(objective_names)}, or a function as module:name or file.py:name")
            load_function(self.objective, "task.objective")

def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def load_function(spec: str, option: str):
    """The function that "module:name" or "path/file.py:name" names, or a ConfigError saying why not."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"{option}={spec!r}: name a function as module:name or file.py:name")
    try:
        if where.endswith(".py"):
            loader_spec = importlib.util.spec_from_file_location(f"zotune_user_{abs(hash(where))}", where)
            if loader_spec is None or not os.path.isfile(where):
                raise ConfigError(f"{option}={spec!r}: no file {where}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise ConfigError(f"{option}={spec!r}: cannot import {where} ({e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"{option}={spec!r}: {where} has no function {name!r}")
    return function


class Movable:
    """A batch of tensors and batches (moved by `to`) and plain values (kept as they are)."""

    def to(self, device):
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), (torch.Tensor, Movable))})


class Task:
    """Rows -> examples (`example`, one per row) -> the fixed seeded split -> batches (`collate`).

    A subclass defines what an example is, how a batch is scored, and:
    - `head(model, batch)`: a context in which the model computes only what the loss needs;
    - `head_loss(model, batch)`: the objective from forwards inside `head` (what a ZO closure runs);
    - `evaluate_batch(model, batch, lockstep)`: summable counts, and `metrics(counts)`: the results;
    - `fixed_inputs`: True when every forward of a probe sees the batch's inputs, as they are (the
      frozen prefix of the network can then be computed once per batch and reused).
    """

    fixed_inputs = True

    def __init__(self, cfg: TaskConfig, tokenizer, table: Table | dict[str, Table]):
        """Rows are checked and split here, without a tokenizer; `bind` (or a tokenizer here) adds it.
        `table`: the rows of `task.data`, or {"data" or "train": rows, and "dev" / "test" where given}."""
        self.cfg = cfg
        self.tokenizer = None
        prepare = load_function(cfg.prepare, "task.prepare") if cfg.prepare else None
        self._fields = template_fields(cfg.template, "task.template")
        tables = table if isinstance(table, dict) else {"data": table}
        self._blank: list[str] = []  # what to say of rows whose prompt reads only empty columns
        examples = {role: self._examples(t, prepare) for role, t in tables.items()}
        pool_role = "train" if "train" in examples else "data"
        pool = self._shuffled(examples[pool_role])
        carved = [role for role in ("test", "dev") if role not in examples]
        need = sum(getattr(cfg, f"n_{role}") for role in carved)
        if need >= len(pool):
            sizes = " + ".join(f"n_{role}={getattr(cfg, f'n_{role}')}" for role in carved)
            raise ConfigError(f"{tables[pool_role].source} has {len(pool)} examples, too few for {sizes} and a train "
                              f"split; lower {' / '.join(f'task.n_{role}' for role in carved)}"
                              + ("" if pool_role == "train" else ", or give the splits as files "
                                                                 "(task.train, task.dev, task.test)"))
        for role in ("test", "dev"):  # test first, then dev, then train: a size never moves an example across
            n = getattr(cfg, f"n_{role}")
            if role in examples:
                given = examples[role]
                setattr(self, role, given if n == 0 or n >= len(given) else self._shuffled(given)[:n])
            else:
                setattr(self, role, pool[:n])
                pool = pool[n:]
        self.train = self.k_shot(pool) if cfg.k_shot else pool[: cfg.n_train] if cfg.n_train else pool
        self.notes = self._blank + self.check_splits()
        if tokenizer is not None:
            self.bind(tokenizer)

    def check_splits(self) -> list[str]:
        """What to say at start-up of splits that would train or score the wrong thing. Here: dev and test
        examples that are training examples too (the same file given twice, repeated rows)."""
        seen, notes = {repr(e) for e in self.train}, []
        for role in ("test", "dev"):
            examples = getattr(self, role)
            same = sum(repr(e) in seen for e in examples)
            if same:
                notes.append(f"{same} of the {len(examples)} {role} examples are training examples too (the same "
                             f"rows): their {role} score overstates what the model learned")
        return notes

    def _examples(self, table: Table, prepare) -> list:
        examples, blank = [], 0
        for i, row in enumerate(table.rows):
            where = table.where(i)
            if prepare is not None:
                try:
                    row = prepare(dict(row))
                except Exception as e:  # the user's function: any error, reported with the row it failed on
                    raise ConfigError(f"{where}: task.prepare={self.cfg.prepare} failed "
                                      f"({type(e).__name__}: {e})") from None
            if self.cfg.text_column != "text" and "text" in self._fields and self.cfg.text_column in row:
                row = {**row, "text": row[self.cfg.text_column]}
            examples.append(self.example(row, where))
            blank += is_blank(self.cfg.template, row)
        if blank == len(examples):
            raise ConfigError(f"every row of {table.source} has empty text in the columns task.template reads "
                              f"({', '.join(self._fields)}): the prompts would all be the template alone; check "
                              f"the column names (task.text_column) or the file")
        if blank:
            self._blank.append(f"{blank} of the {len(examples)} rows of {table.source} have empty text in "
                               f"{', '.join(self._fields)}: their prompt is the template alone")
        return examples

    def _shuffled(self, examples: list) -> list:
        order = list(range(len(examples)))
        random.Random(self.cfg.split_seed).shuffle(order)
        return [examples[i] for i in order]

    def bind(self, tokenizer) -> None:
        """Tokenize with `tokenizer` from now on (checks that need it, e.g. verbalizer tokens, run here)."""
        self.tokenizer = tokenizer

    def describe(self) -> str:
        cfg = self.cfg
        what = {"classification": f"verbalizer {cfg.verbalizer}", "multiple_choice": f"choices {cfg.choices}",
                "generation": f"answer {cfg.answer!r}"}[cfg.type]
        return f"{cfg.name or cfg.data or cfg.train} ({cfg.type.replace('_', ' ')}), template {cfg.template!r}, {what}"

    # -- rows -> examples ---------------------------------------------------------------------
    def example(self, row: dict, where: str):
        raise NotImplementedError

    def k_shot(self, train: list) -> list:
        """The k-shot training set (classification; TaskConfig refuses k_shot for the other types)."""
        raise NotImplementedError

    def render(self, template: str, row: dict, where: str, option: str = "task.template") -> str:
        return render(template, row, where, option)

    def column(self, row: dict, name: str, where: str):
        """The value of `name` in a row; "a.b" reads field b of column a (e.g. SQuAD's answers.text)."""
        value = row
        for i, part in enumerate(name.split(".")):
            if not isinstance(value, dict) or part not in value:
                have = ", ".join(map(str, value)) if isinstance(value, dict) else type(value).__name__
                raise ConfigError(f"{where}: no column {'.'.join(name.split('.')[: i + 1])!r} (has: {have}); "
                                  f"set task.{'answer' if self.cfg.type == 'generation' else 'label_column'}")
            value = value[part]
        return value

    def label_index(self, value) -> int | None:
        """An integer label (or its digits) as an index into task.label_names, else None."""
        if isinstance(value, bool):
            return None
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            return int(value)
        return None

    # -- examples -> batches --------------------------------------------------------------------
    def prompt(self, example) -> str:
        return example[0]

    def lengths(self, examples: list) -> list[int]:
        """Each example's prompt length in tokens, as `collate` truncates it."""
        ids = self.tokenizer([self.prompt(e) for e in examples])["input_ids"]
        return [min(len(i), self.cfg.max_length) for i in ids]

    def batches(self, examples: list, batch_size: int, by_length: bool = False):
        """Fixed-size batches; `by_length` groups similar lengths to cut padding (evaluation)."""
        if by_length:
            lengths = self.lengths(examples)
            examples = [examples[i] for i in sorted(range(len(examples)), key=lengths.__getitem__)]
        for start in range(0, len(examples), batch_size):
            yield self.collate(examples[start: start + batch_size])

    def collate(self, examples: list):
        raise NotImplementedError

    # -- scoring ----------------------------------------------------------------------------------
    def sequences(self, batch):
        """What the model reads for the loss of `batch` (input_ids, attention_mask)."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch):
        """One plain forward of what the loss reads (the frozen prefix is captured from it)."""
        seq = self.sequences(batch)
        return model(input_ids=seq.input_ids, attention_mask=seq.attention_mask, use_cache=False)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The training objective of `batch` (what `task.objective` names)."""
        with self.head(model, batch):
            return self.head_loss(model, batch)

    def zero_counts(self) -> dict[str, float]:
        raise NotImplementedError

    def metrics(self, counts: dict[str, float]) -> dict:
        raise NotImplementedError

    # -- shared by the types that score answer tokens ------------------------------------------------
    def spaced(self, prompt: str, text: str) -> str:
        """`text` as it follows `prompt`: after a space unless the prompt ends in whitespace."""
        return text if prompt.endswith((" ", "\n")) or text.startswith((" ", "\n")) or not text else " " + text

    def prompt_ids(self, prompts: list[str], keep: int) -> list[list[int]]:
        """Token ids of each prompt, its last `keep` kept: the end is where the answer is read."""
        return [ids[-keep:] for ids in self.tokenizer(prompts)["input_ids"]]

    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
