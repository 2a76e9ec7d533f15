"""Data sources: local CSV / JSONL / Parquet, HF datasets on local files, the built-in data sets,
and the one-line errors for bad files."""

import json
import sys

import pytest

from zotune.config import ConfigError
from zotune.tasks import ClassificationTask, TaskConfig, load_rows

ROWS = [{"text": f"film {i} was {'wonderful' if i % 2 else 'awful'}",
         "label": "pos" if i % 2 else "neg"} for i in range(12)]
EXPECTED = ROWS


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_jsonl_and_csv_give_the_same_examples(tmp_path):
    write_parquet(tmp_path / "d.parquet", ROWS)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
    for name in ("d.parquet", "d.jsonl", "d.csv"):
        assert load_rows(str(tmp_path / name)).rows == EXPECTED
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS))
    assert load_rows(str(tmp_path / "d.tsv")).rows == EXPECTED


def test_a_csv_file_saved_by_excel_with_a_byte_order_mark_reads_the_same(tmp_path):
    (tmp_path / "d.csv").write_bytes(("\ufefftext,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
                                     .encode("utf-8"))
    assert load_rows(str(tmp_path / "d.csv")).rows == EXPECTED


@pytest.mark.parametrize("name,content,match", [
    ("mixed.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n', r"mixed.jsonl:2: label 'pos' is a "
                                                                                  r"str, but the label of "
                                                                                  r".*mixed.jsonl:1 is a int"),
    ("broken.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label"\n', r"broken.jsonl:2: not valid JSON"),
    ("nolabel.csv", "text,stars\nfine,5\n", r"nolabel.csv:2: no column 'label' \(has: text, stars\)"),
    ("empty.csv", "text,label\n", r"has no rows"),
    ("data.txt", "hello\n", r"unsupported type '.txt'"),
])
def test_bad_data_files_name_the_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=match):
        ClassificationTask(TaskConfig(data=str(tmp_path / name), verbalizer={"1": "yes", "pos": "good"}, n_test=1,
                                      n_dev=0),
                           None, load_rows(str(tmp_path / name)))


def test_parquet_errors_name_the_row(tmp_path):
    write_parquet(tmp_path / "p.parquet", [{"text": "a", "grade": "x"}])
    with pytest.raises(ConfigError, match=r"p.parquet row 1: no column 'label' \(has: text, grade\)"):
        ClassificationTask(TaskConfig(data="p", verbalizer={"a": "x", "b": "y"}), None,
                           load_rows(str(tmp_path / "p.parquet")))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="not a readable Parquet file"):
        load_rows(str(tmp_path / "fake.parquet"))


def test_hf_datasets_on_local_files_with_class_label_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hub-like"
    folder.mkdir()
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = {"text": [r["text"] for r in ROWS], "label": [1 if r["label"] == "pos" else 0 for r in ROWS]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train.parquet"))
    test_rows = datasets.Dataset.from_dict({k: v[:4] for k, v in rows.items()}, features=features)
    test_rows.to_parquet(str(folder / "test.parquet"))
    assert load_rows(f"hf:{folder}").rows == EXPECTED  # split train by default; integers become their names
    assert load_rows(f"hf:{folder}@test").rows == EXPECTED[:4]
    with pytest.raises(ConfigError, match=r"task.data=hf:.*@nope: datasets could not load it"):
        load_rows(f"hf:{folder}@nope")


def test_hf_source_without_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ConfigError, match="needs the datasets package: pip install datasets"):
        load_rows("hf:rotten_tomatoes")


@pytest.mark.parametrize("name,size,labels", [("rotten_tomatoes", 12808, {"fresh", "rotten"}),
                                              ("bbc_news", 2225,
                                               {"business", "entertainment", "politics", "sports", "tech"}),
                                              ("tweets", 38158, {"negative", "neutral", "positive"})])
def test_builtin_data_sets_come_with_their_prompt(name, size, labels, tokenizer):
    examples = load_rows(name)
    assert len(examples.rows) == size and {r["label"] for r in examples.rows} == labels
    assert all(r["text"].strip() for r in examples.rows)
    cfg = TaskConfig(data=name, n_train=50, n_dev=10, n_test=20)
    assert set(cfg.verbalizer) == labels and "{text}" in cfg.template
    task = ClassificationTask(cfg, tokenizer, examples)  # every verbalizer word has its own first token
    assert len(set(task.label_token_ids)) == len(labels) and len(task.train) == 50


def test_own_data_needs_a_verbalizer_and_a_user_prompt_wins():
    with pytest.raises(ConfigError, match=r"task.verbalizer is needed for my.csv"):
        TaskConfig(data="my.csv")
    cfg = TaskConfig(data="tweets", template="Tweet: {text}\nMood:")
    assert cfg.template == "Tweet: {text}\nMood:" and set(cfg.verbalizer) == {"negative", "neutral", "positive"}


def test_k_shot_takes_k_of_each_label_from_the_fixed_split(tokenizer):
    examples = load_rows("tweets")
    cfg = dict(data="tweets", n_dev=50, n_test=100, split_seed=3)
    task16 = ClassificationTask(TaskConfig(k_shot=16, **cfg), tokenizer, examples)
    task4 = ClassificationTask(TaskConfig(k_shot=4, **cfg), tokenizer, examples)
    plain = ClassificationTask(TaskConfig(**cfg), tokenizer, examples)
    from collections import Counter

    assert Counter(label for _, label in task16.train) == {"negative": 16, "neutral": 16, "positive": 16}
    assert set(task4.train) <= set(task16.train)  # nested: a larger k only adds examples
    assert task16.test == plain.test and task16.dev == plain.dev  # dev and test do not move
    assert not {id(e) for e in task16.train} & {id(e) for e in plain.test}  # (the data repeats some tweets)
    with pytest.raises(ConfigError, match=r"task.k_shot=20000: label '\w+' has only \d+ training examples"):
        ClassificationTask(TaskConfig(k_shot=20000, **cfg), tokenizer, examples)


def _csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    return str(path)


def _texts(examples):
    return sorted(e[0].removesuffix(" It was") for e in examples)


def test_splits_from_their_own_files_and_the_single_file_split_unchanged(tmp_path):
    """task.train / task.dev / task.test: a given split is read whole (or n of it, seeded); the others
    are carved from the training rows as the single-file split carves them from task.data."""
    from zotune.tasks import make_task

    rows = [{"text": f"review {i}", "label": "pos" if i % 2 else "neg"} for i in range(60)]
    train, dev, test = _csv(tmp_path / "tr.csv", rows[:40]), _csv(tmp_path / "dv.csv", rows[40:48]), \
        _csv(tmp_path / "te.csv", rows[48:])
    verb = {"pos": "great", "neg": "terrible"}
    task = make_task(TaskConfig(train=train, dev=dev, test=test, verbalizer=verb), None)
    assert (len(task.train), len(task.dev), len(task.test)) == (40, 8, 12)
    assert _texts(task.test) == sorted(r["text"] for r in rows[48:])
    assert _texts(task.dev) == sorted(r["text"] for r in rows[40:48])
    sampled = make_task(TaskConfig(train=train, dev=dev, test=test, verbalizer=verb, n_test=5, n_dev=0), None)
    assert len(sampled.test) == 5 and set(_texts(sampled.test)) <= set(_texts(task.test)) and len(sampled.dev) == 8
    # only a test file: dev is carved from the training rows, exactly as from a single file of them
    only_test = make_task(TaskConfig(train=train, test=test, verbalizer=verb, n_dev=6), None)
    single = make_task(TaskConfig(data=train, verbalizer=verb, n_test=0 + 10, n_dev=6), None)
    assert _texts(only_test.test) == _texts(task.test) and len(only_test.dev) == 6 and len(only_test.train) == 34
    assert _texts(only_test.dev + only_test.train) == _texts(single.test + single.dev + single.train)
    # the single-file split: test first, then dev, then train, by the fixed seed (unchanged)
    import random
    order = list(range(40))
    random.Random(0).shuffle(order)
    assert [e[0] for e in single.test] == [rows[i]["text"] + " It was" for i in order[:10]]
    with pytest.raises(ConfigError, match="both name the training rows"):
        TaskConfig(data=train, train=train, verbalizer=verb)
    with pytest.raises(ConfigError, match=r"names no split; add it, e.g. task.dev=hf:x@validation"):
        TaskConfig(train=train, dev="hf:x", verbalizer=verb)
    with pytest.raises(ConfigError, match="task.n_test must be >= 1"):
        TaskConfig(data=train, verbalizer=verb, n_test=0)


def test_hf_named_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    from zotune.tasks import make_task

    folder = tmp_path / "hub-like"
    folder.mkdir()
    for split, n in (("train", 30), ("validation", 6), ("test", 8)):
        datasets.Dataset.from_list([{"text": f"{split} {i}", "label": "pos" if i % 2 else "neg"} for i in range(n)]) \
            .to_parquet(str(folder / f"{split}.parquet"))
    task = make_task(TaskConfig(train=f"hf:{folder}@train", dev=f"hf:{folder}@validation", test=f"hf:{folder}@test",
                                verbalizer={"pos": "great", "neg": "terrible"}), None)
    assert (len(task.train), len(task.dev), len(task.test)) == (30, 6, 8)
    assert all(e[0].startswith("validation") for e in task.dev) and all(e[0].startswith("test") for e in task.test)


def test_yes_no_labels_and_a_newline_typed_on_the_command_line(tmp_path):
    """YAML 1.1 reads yes / no / on / off as booleans; zotune's options read them as the words they are.
    A template typed with \\n on a command line gets a newline."""
    from zotune.resolve import resolve_configs
    from zotune.tasks import make_task

    data = _csv(tmp_path / "yn.csv", [{"text": f"q{i}", "label": "yes" if i % 2 else "no"} for i in range(30)])
    cfgs = resolve_configs(None, [f"task.data={data}", "task.verbalizer={yes: ' yes', no: ' no'}",
                                  "task.template=Q: {text}\\nA:", "task.n_test=4", "task.n_dev=2"])
    assert cfgs["task"].verbalizer == {"yes": " yes", "no": " no"} and cfgs["task"].template == "Q: {text}\nA:"
    task = make_task(cfgs["task"], None)
    assert {e[1] for e in task.train} == {"yes", "no"}
    (tmp_path / "c.yaml").write_text(f"task:\n  data: {data}\n  verbalizer: {{on: ' on', off: ' off'}}\n"
                                     "  template: \"{text}\\nA:\"\nrun:\n  group_by_length: yes\n")
    cfgs = resolve_configs(tmp_path / "c.yaml")
    assert cfgs["task"].verbalizer == {"on": " on", "off": " off"} and cfgs["task"].template == "{text}\nA:"
    assert cfgs["run"].group_by_length is True
    literal = resolve_configs(None, ["task.template={text}\\\\n"])  # \\ keeps a backslash
    assert literal["task"].template == "{text}\\n"


def test_test_rows_that_are_training_rows_too_are_counted_at_start_up(tmp_path):
    rows = ROWS + ROWS[:6]  # six rows twice: a test row may have a twin among the training rows
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    task = ClassificationTask(TaskConfig(data=str(tmp_path / "d.csv"), verbalizer={"pos": "good", "neg": "bad"},
                                         n_dev=0, n_test=6), None, load_rows(str(tmp_path / "d.csv")))
    twins = sum(repr(e) in {repr(t) for t in task.train} for e in task.test)
    assert twins and task.notes == [f"{twins} of the 6 test examples are training examples too (the same rows): "
                                    f"their test score overstates what the model learned"]


def test_a_training_split_of_one_label_is_named_at_start_up(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"film {i},pos\n" for i in range(30)))
    task = ClassificationTask(TaskConfig(data=str(tmp_path / "d.csv"), verbalizer={"pos": "good", "neg": "bad"},
                                         n_dev=0, n_test=2), None, load_rows(str(tmp_path / "d.csv")))
    assert task.notes[0].startswith("the training examples hold one label only ('pos')")


def test_a_tab_separated_file_named_csv_is_read_as_tab_separated(tmp_path):
    (tmp_path / "d.csv").write_text("text\tlabel\n" + "".join(f"{r['text']}, really\t{r['label']}\n" for r in ROWS))
    assert load_rows(str(tmp_path / "d.csv")).rows == [{**r, "text": r["text"] + ", really"} for r in ROWS]


def test_line_numbers_count_the_newlines_inside_quoted_values(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"two\nlines",pos\n\nplain,neg\n"x",meh\n')
    table = load_rows(str(tmp_path / "d.csv"))
    assert [table.where(i) for i in range(3)] == [f"{tmp_path / 'd.csv'}:{n}" for n in (2, 5, 6)]
    with pytest.raises(ConfigError, match=r"d.csv:6: label 'meh' has no verbalizer word"):
        ClassificationTask(TaskConfig(data="d", verbalizer={"pos": "good", "neg": "bad"}), None, table)


def test_a_json_object_holding_the_list_of_rows_is_read(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"version": "1.0", "data": ROWS}))
    assert load_rows(str(tmp_path / "d.json")).rows == EXPECTED


def test_empty_texts_are_counted_at_start_up(tmp_path):
    rows = ROWS + [{"text": " ", "label": "pos"}, {"text": "", "label": "neg"}]
    task = ClassificationTask(TaskConfig(data="d", verbalizer={"pos": "good", "neg": "bad"}, n_test=2, n_dev=2), None,
                              load_rows_of(tmp_path, rows))
    assert any("2 of the 14 rows of" in n and "have empty text in text" in n for n in task.notes)


def test_a_verbalizer_word_of_several_tokens_is_named_at_start_up(tokenizer, tmp_path):
    task = ClassificationTask(TaskConfig(data="d", verbalizer={"pos": "good", "neg": "dreadfulness"}, n_test=2,
                                         n_dev=2), tokenizer, load_rows_of(tmp_path, ROWS))
    words = [n for n in task.notes if "scored on the first token only" in n]
    assert len(words) == 1 and "'dreadfulness' (" in words[0] and "'good'" not in words[0]
    task.bind(tokenizer)  # bound again (zotune eval): said once
    assert len([n for n in task.notes if "scored on the first token only" in n]) == 1


def load_rows_of(tmp_path, rows):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_rows(str(tmp_path / "rows.jsonl"))
