"""Every bad input a user can give, in one table: exit code 2, one line naming the problem and the fix,
nothing of the user's changed, and (for a refused new run) nothing written.

A case is (id, setup, argv, expected text). `setup(w)` damages or creates files in the case's own
folder; `argv(w)` is the command line. After the command, every file that existed before it is
unchanged, and a refused `train` has created no run folder and no stream folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from zotune.cli import main
from zotune.steplog import LOG_MAGIC

FAST = ["run.eval_every=0", "run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.device=cpu", "run.steps=2",
        "model.trainable=last-blocks:2"]
VERB = "task.verbalizer={pos: great, neg: terrible}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    """What the cases copy: the data, a finished run, a disk-tier run and a stream folder."""
    root = tmp_path_factory.mktemp("bad-input")
    data = root / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"film {i} was {'wonderful' if i % 2 else 'awful'},"
                                            f"{'pos' if i % 2 else 'neg'}\n" for i in range(40)))
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), VERB, *FAST]
    assert main([*args, "--out", str(root / "run")]) == 0
    assert main([*args, "--out", str(root / "disk-run"), "--offload", "disk", "--offload-dir",
                 str(root / "disk-run-blocks")]) == 0
    assert main(["stream", "prepare", "--model", str(tiny_model_dir), "--out", str(root / "stream")]) == 0
    return root


class World:
    """The paths a case uses: its own copies of what it may damage."""

    def __init__(self, tmp: Path, prepared: Path, model: Path):
        self.tmp, self.prepared, self.model = tmp, prepared, model
        self.data = tmp / "reviews.csv"
        shutil.copy(prepared / "reviews.csv", self.data)
        self.out = tmp / "out"

    def copy(self, name: str) -> Path:
        """A copy of a prepared folder (a run, a stream folder) in the case's folder."""
        dst = self.tmp / name
        if not dst.exists():
            shutil.copytree(self.prepared / name, dst)
        return dst

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def model_copy(self) -> Path:
        dst = self.tmp / "model"
        if not dst.exists():
            shutil.copytree(self.model, dst)
        return dst

    def train(self, *extra: str, data: Path | None = None, model: Path | None = None) -> list[str]:
        return ["train", "--model", str(model or self.model), "--data", str(data or self.data), "--out",
                str(self.out), VERB, *FAST, *extra]

    def disk_run(self) -> Path:
        """A copy of the disk-tier run whose config points at its own copy of the blocks."""
        run, blocks = self.copy("disk-run"), self.copy("disk-run-blocks")
        config = run / "config.yaml"
        config.write_text(config.read_text().replace(str(self.prepared / "disk-run-blocks"), str(blocks)))
        return run


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _replace(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


def _edit_config(run: Path, section: str, key: str, value) -> None:
    """config.yaml of `run` edited by hand: `section.key` set to `value`."""
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    config[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _gguf_prefix(w: World) -> Path:
    from zotune.models import ModelConfig, resolve_source

    folder, name = resolve_source(ModelConfig())
    with open(Path(folder) / name, "rb") as f:
        return w.file("cut.gguf", f.read(200_000))


@dataclass
class Case:
    id: str
    argv: object  # World -> list[str]
    expect: str  # text the one line must contain
    setup: object = None  # World -> None
    writes_nothing: bool = True  # a refused new run leaves no --out and no stream folder


T = Case  # the table reads better short
CASES = [
    # -- the model -------------------------------------------------------------------------------
    T("model-missing", lambda w: w.train(model=w.tmp / "no-such-model"), "does not exist"),
    T("model-is-a-plain-file", lambda w: w.train(model=w.file("passwd", "root:x:0:0:root:/root:/bin/bash\n")),
      "is a file, not a model"),
    T("model-gguf-not-gguf", lambda w: w.train(model=w.file("m.gguf", "hello")), "not a GGUF file"),
    T("model-gguf-truncated", lambda w: w.train(model=_gguf_prefix(w)), "could not be read as a GGUF model"),
    T("model-gguf-missing", lambda w: w.train(model=w.tmp / "none.gguf"), "does not exist"),
    T("model-folder-empty", lambda w: w.train(model=w.tmp / "empty"), "could not load model",
      setup=lambda w: (w.tmp / "empty").mkdir()),
    T("model-config-damaged", lambda w: w.train(model=w.tmp / "model"), "could not load model",
      setup=lambda w: w.file("model/config.json", "{not json") if w.model_copy() else None),
    T("model-weights-truncated", lambda w: w.train(model=w.tmp / "model"), "SafetensorError",
      setup=lambda w: _truncate(w.model_copy() / "model.safetensors", 5000)),
    T("model-weights-missing", lambda w: w.train(model=w.tmp / "model"), "could not load model",
      setup=lambda w: (w.model_copy() / "model.safetensors").unlink()),
    T("model-dtype", lambda w: w.train("model.dtype=float64"), "model.dtype"),
    T("model-quantize-kind", lambda w: w.train("model.quantize=int3"), "model.quantize"),
    T("trainable-unknown-form", lambda w: w.train("--trainable", "half"), "model.trainable"),
    T("trainable-bad-regex", lambda w: w.train("--trainable", "re:layers.(1"), "not a valid regular expression"),
    T("trainable-selects-nothing", lambda w: w.train("--trainable", "re:^nothing$"), "selects no parameter"),
    T("trainable-more-blocks-than-the-model", lambda w: w.train("--trainable", "last-blocks:9"),
      "the model has 3 blocks"),
    T("trainable-scales-unquantized", lambda w: w.train("--trainable", "scales"), "model.quantize"),
    T("blocks-path-wrong", lambda w: w.train("model.blocks_path=model.nope"), "model.blocks_path"),
    # -- the data --------------------------------------------------------------------------------
    T("data-missing", lambda w: w.train(data=w.tmp / "nope.csv"), "nope.csv does not exist"),
    T("data-is-a-folder", lambda w: w.train(data=w.tmp), "is a folder"),
    T("data-header-only", lambda w: w.train(data=w.file("e.csv", "text,label\n")), "has no rows"),
    T("data-empty-file", lambda w: w.train(data=w.file("e.csv", "")), "has no rows"),
    T("data-unknown-type", lambda w: w.train(data=w.file("d.txt", "x")), "unsupported type"),
    T("data-no-text-column", lambda w: w.train(data=w.file("d.csv", "review,label\na,pos\n")), "task.text_column"),
    T("data-no-label-column", lambda w: w.train(data=w.file("d.csv", "text,y\na,pos\n" * 20)), "label"),
    T("data-bad-jsonl-line", lambda w: w.train(data=w.file("d.jsonl", '{"text": "a", "label": "pos"}\n{oops\n')),
      "d.jsonl:2"),
    T("data-json-not-objects", lambda w: w.train(data=w.file("d.json", "[1, 2, 3]")), "not an object"),
    T("data-json-damaged", lambda w: w.train(data=w.file("d.json", '[{"text": "a"')), "not valid JSON"),
    T("data-json-one-object", lambda w: w.train(data=w.file("d.json", '{"text": "a", "label": "pos"}')),
      "one JSON object with no list of rows"),
    T("data-json-two-lists", lambda w: w.train(data=w.file("d.json", json.dumps(
        {"train": [{"text": "a", "label": "pos"}], "test": [{"text": "b", "label": "neg"}]}))), "several lists"),
    T("data-csv-short-row", lambda w: w.train(data=w.file("d.csv", 'text,label\n"a\nb",pos\nc\n')),
      "d.csv:4: a short row: 1 value for the 2 columns"),
    T("data-csv-long-row", lambda w: w.train(data=w.file("d.csv", "text,label\nfine, really,pos\n")),
      "d.csv:2: 3 values, more than the 2 columns"),
    T("data-all-texts-empty", lambda w: w.train(data=w.file("d.csv", "text,label\n" + ",pos\n ,neg\n" * 20)),
      "every row of"),
    T("data-nested-column-in-prompt", lambda w: w.train(data=w.file("d.jsonl", "".join(json.dumps(
        {"text": {"title": "t", "body": f"b{i}"}, "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(40)))),
      "{text} is an object"),
    T("template-positional-field", lambda w: w.train("--template", "{0} It was"), "positional field {0}"),
    T("template-attribute-field", lambda w: w.train("--template", "{text.upper} It was"), "reads an attribute"),
    T("template-bad-format-spec", lambda w: w.train("--template", "{text:d} It was"), "cannot be filled"),
    T("data-fake-parquet", lambda w: w.train(data=w.file("d.parquet", "not parquet")), "Parquet"),
    T("data-not-utf8", lambda w: w.train(data=w.file("d.csv", b"text,label\n\xff\xfe\x00bad,pos\n")), "UTF-8"),
    T("data-unknown-label", lambda w: w.train(data=w.file("d.csv", "text,label\n" + "a,pos\nb,neg\nc,meh\n" * 10)),
      "'meh'"),
    T("data-too-few-examples", lambda w: w.train("task.n_test=30", "task.n_dev=10"), "too few"),
    T("data-k-shot-too-large", lambda w: w.train("task.k_shot=50"), "task.k_shot=50"),
    T("data-split-file-missing", lambda w: w.train("task.test=" + str(w.tmp / "t.csv")), "t.csv does not exist"),
    T("data-and-train-both", lambda w: w.train("task.train=" + str(w.data)), "both name the training rows"),
    T("data-column-twice", lambda w: w.train(data=w.file("d.csv", "text,label,text\n" + "a,pos,b\n" * 20)),
      "the column 'text' is named twice"),
    T("data-hf-split-missing", lambda w: w.train("task.test=hf:glue"), "names no split"),
    # -- the task options ------------------------------------------------------------------------
    T("task-type", lambda w: w.train("task.type=regression"), "task.type"),
    T("task-metric", lambda w: w.train("task.metric=bleu"), "task.metric"),
    T("task-template-field", lambda w: w.train("task.template={text} {lable}"), "field {lable} is not in the row"),
    T("task-template-constant", lambda w: w.train("task.template=Hello"), "no {column} field"),
    T("task-template-broken", lambda w: w.train("task.template={text"), "not a valid template"),
    T("task-verbalizer-one-label", lambda w: w.train("task.verbalizer={pos: great}"), "at least two labels"),
    T("task-verbalizer-a-list", lambda w: w.train("task.verbalizer=[a, b]"), "must be a mapping"),
    T("task-verbalizer-empty-word", lambda w: w.train("task.verbalizer={pos: great, neg: ''}"), "empty word"),
    T("task-verbalizer-bad-yaml", lambda w: w.train("task.verbalizer={pos: [great}"), "not valid YAML"),
    T("task-n-test-zero", lambda w: w.train("task.n_test=0"), "task.n_test"),
    T("task-max-length", lambda w: w.train("task.max_length=4"), "task.max_length"),
    T("task-objective", lambda w: w.train("task.objective=nope"), "task.objective"),
    T("task-prepare-missing", lambda w: w.train("task.prepare=no_such_module_zt:fn"), "cannot import"),
    T("task-name", lambda w: w.train("task.name=nope"), "task.name"),
    T("task-file-missing", lambda w: w.train("--task", str(w.tmp / "t.yaml")), "does not exist"),
    T("task-file-bad-yaml", lambda w: w.train("--task", str(w.file("t.yaml", "template: [oops"))), "not valid YAML"),
    T("task-file-unknown-option", lambda w: w.train("--task", str(w.file("t.yaml", "templat: x\n"))), "templat"),
    # -- method, run, stream, adapter, parallel options ------------------------------------------
    T("method-eps", lambda w: w.train("method.eps=0"), "method.eps"),
    T("method-lr-text", lambda w: w.train("method.lr=abc"), "not a float"),
    T("method-lr-nan", lambda w: w.train("method.lr=nan"), "method.lr"),
    T("method-name", lambda w: w.train("--method", "sgd"), "not a known method"),
    T("method-unknown-option", lambda w: w.train("method.lrr=1"), "unknown option method.lrr"),
    T("method-option-of-another", lambda w: w.train("method.beta1=0.9"), "unknown option method.beta1"),
    T("method-distribution", lambda w: w.train("method.distribution=uniform"), "method.distribution"),
    T("method-momentum-range", lambda w: w.train("--method", "zosgd-momentum", "method.momentum=1.5"),
      "method.momentum"),
    T("run-steps", lambda w: w.train("run.steps=-3"), "run.steps"),
    T("run-batch-size", lambda w: w.train("run.batch_size=0"), "run.batch_size"),
    T("run-device", lambda w: w.train("run.device=tpu9"), "run.device"),
    T("run-device-absent", lambda w: w.train("run.device=cuda"), "run.device"),
    T("run-bool", lambda w: w.train("run.group_by_length=maybe"), "not a boolean"),
    T("override-form", lambda w: w.train("oops=1"), "section.key=value"),
    T("override-section", lambda w: w.train("optim.lr=1"), "unknown config section"),
    T("config-missing", lambda w: w.train("--config", str(w.tmp / "c.yaml")), "does not exist"),
    T("config-bad-yaml", lambda w: w.train("--config", str(w.file("c.yaml", "run: [oops"))), "not valid YAML"),
    T("config-a-list", lambda w: w.train("--config", str(w.file("c.yaml", "- a\n- b\n"))), "must map sections"),
    T("stream-tier", lambda w: w.train("stream.tier=floppy"), "stream.tier"),
    T("stream-disk-no-dir", lambda w: w.train("stream.tier=disk"), "stream.dir"),
    T("stream-prefetch", lambda w: w.train("--offload", "cpu", "stream.prefetch=0"), "stream.prefetch"),
    T("stream-device-blocks", lambda w: w.train("--offload", "cpu", "stream.device_blocks=1"),
      "stream.device_blocks=1 must be 0 (prefetch + 2) or an integer >= stream.prefetch + 1 = 2"),
    T("stream-storage-dtype", lambda w: w.train("--offload", "cpu", "stream.storage_dtype=int8"), "storage_dtype"),
    T("adapter-kind", lambda w: w.train("adapter.kind=ia3"), "adapter.kind"),
    T("adapter-rank", lambda w: w.train("adapter.kind=lora", "adapter.r=0"), "adapter.r"),
    T("parallel-without-torchrun", lambda w: w.train("parallel.data=2"), "processes"),
    T("parallel-zero", lambda w: w.train("parallel.perturb=0"), "parallel.perturb"),
    # -- combinations, refused before anything is written ------------------------------------------
    T("combo-forward-grad-ranks", lambda w: w.train("--method", "forward-grad", "parallel.data=2"), "one process"),
    T("disk-tier-selects-nothing", lambda w: w.train("--trainable", "re:^nothing$", "--offload", "disk",
                                                     "--offload-dir", str(w.tmp / "blocks")), "selects no parameter"),
    T("combo-quantize-lora", lambda w: w.train("model.quantize=int8", "adapter.kind=lora"), "model.quantize"),
    T("combo-quantize-stream-folder", lambda w: w.train("model.quantize=int8", model=w.copy("stream")),
      "blocks stay as they were written"),
    T("combo-quantize-float-disk-folder", lambda w: w.train("model.quantize=int4", "--offload", "disk", "--offload-dir",
                                                            str(w.copy("stream"))), "holds float blocks"),
    T("combo-conservative-streamed", lambda w: w.train("--method", "zosgd-conservative", "--offload", "cpu"),
      "cannot be streamed"),
    T("combo-forward-grad-disk", lambda w: w.train("--method", "forward-grad", "--offload", "disk", "--offload-dir",
                                                   str(w.tmp / "blocks")), "cannot be streamed"),
    T("combo-hizoo-directions", lambda w: w.train("--method", "hizoo", "method.n_directions=2"),
      "one two-sided direction"),
    T("combo-storage-without-tier", lambda w: w.train("stream.storage_dtype=bfloat16"), "add --offload"),
    # -- run folders -----------------------------------------------------------------------------
    T("out-holds-a-run", lambda w: w.train() + ["--out", str(w.copy("run"))], "already holds a run",
      writes_nothing=False),
    T("out-is-a-file", lambda w: w.train() + ["--out", str(w.file("taken", "mine"))], "--out", writes_nothing=False),
    T("out-is-a-users-folder", lambda w: w.train() + ["--out", str(w.tmp / "mine")],
      "is not empty (it holds config.yaml", setup=lambda w: w.file("mine/config.yaml", "run: {steps: 5}\n"),
      writes_nothing=False),
    T("out-in-a-file", lambda w: w.train() + ["--out", str(w.file("taken", "mine") / "run")], "cannot write",
      writes_nothing=False),
    T("offload-dir-is-a-users-folder", lambda w: w.train("--offload", "disk", "--offload-dir", str(w.tmp / "mine")),
      "is not empty (it holds notes.txt", setup=lambda w: w.file("mine/notes.txt", "keep me")),
    T("stream-prepare-into-a-users-folder", lambda w: ["stream", "prepare", "--model", str(w.model), "--out",
                                                       str(w.tmp / "mine")], "is not empty",
      setup=lambda w: w.file("mine/notes.txt", "keep me")),
    T("stream-prepare-into-a-file", lambda w: ["stream", "prepare", "--model", str(w.model), "--out",
                                               str(w.file("taken", "mine"))], "is a file"),
    T("export-into-a-file", lambda w: ["export", str(w.copy("run")), "--out", str(w.file("taken", "mine"))],
      "is a file"),
    T("replay-into-a-users-folder", lambda w: ["replay", str(w.copy("run")), "--out", str(w.tmp / "mine")],
      "is not empty", setup=lambda w: w.file("mine/notes.txt", "keep me")),
    T("eval-out-is-a-users-file", lambda w: ["eval", "--model", str(w.copy("run")), "--out", str(w.tmp / "r.json")],
      "exists and zotune did not write it", setup=lambda w: w.file("r.json", '{"mine": 1}')),
    T("eval-out-is-a-folder", lambda w: ["eval", "--model", str(w.copy("run")), "--out", str(w.tmp)], "is a folder"),
    T("compare-out-is-a-users-folder", lambda w: ["compare", "--run", "zosgd", "--out", str(w.tmp / "mine")],
      "is not empty", setup=lambda w: w.file("mine/notes.txt", "keep me")),
    T("run-steps-infinite", lambda w: w.train("run.steps=inf"), "run.steps='inf' is not a whole number"),
    T("run-steps-astronomical", lambda w: w.train("run.steps=1e30"), "too large"),
    T("run-steps-beyond-the-log", lambda w: w.train("--steps", "1e12"), "below 2**32"),
    T("run-batch-size-fraction", lambda w: w.train("run.batch_size=2.5"), "not a whole number"),
    T("run-seed-astronomical", lambda w: w.train("run.seed=99999999999999999999999"), "too large"),
    T("verbalizer-key-twice", lambda w: w.train("task.verbalizer={pos: great, pos: good, neg: bad}"),
      "the key 'pos' appears twice"),
    T("template-reads-the-label", lambda w: w.train("task.template={text} {label} It was"),
      "reads the label column {label}"),
    T("negative-eps-flag", lambda w: w.train("--eps", "-1e-3"), "method.eps=-0.001 must be"),
    T("resume-not-a-run", lambda w: ["resume", str(w.tmp)], "not a zotune run folder"),
    T("resume-missing", lambda w: ["resume", str(w.tmp / "gone")], "not a zotune run folder"),
    T("resume-finished", lambda w: ["resume", str(w.copy("run"))], "already finished"),
    T("resume-other-options", lambda w: ["resume", str(w.copy("run")), "method.lr=1"], "resume takes only run.*"),
    T("resume-config-damaged", lambda w: ["resume", str(w.tmp / "run")], "config.yaml",
      setup=lambda w: (w.copy("run") / "config.yaml").write_text("model: [oops")),
    T("resume-model-gone", lambda w: ["resume", str(w.tmp / "run"), "run.steps=4"], "does not exist",
      setup=lambda w: _replace(w.copy("run") / "config.yaml", str(w.model), str(w.tmp / "gone"))),
    T("resume-edited-lr", lambda w: ["resume", str(w.tmp / "run"), "run.steps=4"], "method.lr is 0.5 but run",
      setup=lambda w: _edit_config(w.copy("run"), "method", "lr", 0.5)),
    T("resume-edited-trainable", lambda w: ["resume", str(w.tmp / "run"), "run.steps=4"], "model.trainable is 'all'",
      setup=lambda w: _edit_config(w.copy("run"), "model", "trainable", "all")),
    T("resume-other-batch-size", lambda w: ["resume", str(w.copy("run")), "run.steps=4", "run.batch_size=2"],
      "run.batch_size is 2 but run"),
    T("resume-other-seed", lambda w: ["resume", str(w.copy("run")), "run.steps=4", "parallel.data=1",
                                      "run.seed=3"], "run.seed is 3 but run"),
    T("export-edited-trainable", lambda w: ["export", str(w.tmp / "run"), "--out", str(w.tmp / "x")],
      "model.trainable is 'all'", setup=lambda w: _edit_config(w.copy("run"), "model", "trainable", "all")),
    T("eval-edited-method", lambda w: ["eval", "--model", str(w.tmp / "run")], "method.eps is 0.5 but run",
      setup=lambda w: _edit_config(w.copy("run"), "method", "eps", 0.5)),
    T("resume-base-json-damaged", lambda w: ["resume", str(w.tmp / "run"), "run.steps=4"], "base.json",
      setup=lambda w: (w.copy("run") / "base.json").write_text("{")),
    T("export-into-non-empty", lambda w: ["export", str(w.copy("run")), "--out", str(w.copy("disk-run-blocks"))],
      "not empty"),
    T("export-not-a-run", lambda w: ["export", str(w.tmp), "--out", str(w.tmp / "x")], "not a zotune run folder"),
    T("replay-missing", lambda w: ["replay", str(w.tmp / "gone"), "--out", str(w.tmp / "x")], "run folder"),
    T("eval-split", lambda w: ["eval", "--model", str(w.copy("run")), "--split", "valid"], "choose from"),
    T("eval-run-with-method", lambda w: ["eval", "--model", str(w.copy("run")), "method.lr=1"], "pass only task.*"),
    # -- stream folders ----------------------------------------------------------------------------
    T("stream-block-truncated", lambda w: w.train(model=w.tmp / "stream"), "truncated",
      setup=lambda w: _truncate(w.copy("stream") / "block-00001.bin", 5000)),
    T("stream-block-missing", lambda w: w.train(model=w.tmp / "stream"), "missing",
      setup=lambda w: (w.copy("stream") / "block-00002.bin").unlink()),
    T("stream-manifest-damaged", lambda w: w.train(model=w.tmp / "stream"), "damaged",
      setup=lambda w: (w.copy("stream") / "manifest.json").write_text("{")),
    T("stream-block-swapped", lambda w: w.train(model=w.tmp / "stream"), "another model or position",
      setup=lambda w: shutil.copy(w.copy("stream") / "block-00000.bin", w.tmp / "stream" / "block-00001.bin")),
    T("stream-with-ram-tier", lambda w: w.train("--offload", "cpu", model=w.copy("stream")), "drop stream.tier=cpu"),
    T("stream-prepare-existing", lambda w: ["stream", "prepare", "--model", str(w.model), "--out",
                                            str(w.copy("stream"))], "already holds a stream folder"),
    T("disk-run-blocks-missing", lambda w: ["resume", str(w.tmp / "disk-run"), "run.steps=4"], "is missing",
      setup=lambda w: shutil.rmtree(w.disk_run().parent / "disk-run-blocks")),
]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_loses_nothing(case, prepared, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    w = World(tmp_path, prepared, tiny_model_dir)
    if case.setup is not None:
        case.setup(w)
    argv = case.argv(w)
    before = _digests(tmp_path)
    model_before = _digests(tiny_model_dir)
    capsys.readouterr()
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("zotune: error: "), (code, err)
    assert case.expect in err[0], err[0]
    after = _digests(tmp_path)
    assert {k: after.get(k) for k in before} == before, "a file of the user's changed"
    assert _digests(tiny_model_dir) == model_before
    if case.writes_nothing and argv[0] == "train":
        assert set(after) == set(before), f"a refused run wrote {sorted(set(after) - set(before))[:3]}"
        assert not w.out.exists() and not (tmp_path / "blocks").exists()


def test_a_disk_tier_run_refused_after_loading_writes_no_stream_folder(prepared, tiny_model_dir, tmp_path, capsys):
    """Refusals that need the loaded model (here: a trainable spec that selects nothing) come before the
    stream folder is written, and a run refused later takes away the folder it wrote."""
    w = World(tmp_path, prepared, tiny_model_dir)
    assert main(w.train("--trainable", "re:^nothing$", "--offload", "disk", "--offload-dir",
                        str(tmp_path / "blocks"))) == 2
    assert not (tmp_path / "blocks").exists() and not w.out.exists()
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == json.dumps(["reviews.csv"])
    # a refusal after the folder is written (--out is the folder of a run killed before its first step,
    # whose base.json names another model): the stream folder goes again, the run folder is as it was
    w.out.mkdir()
    (w.out / "base.json").write_text(json.dumps({"model": "other", "hash": "0" * 32}))
    (w.out / "steps.log").write_bytes(LOG_MAGIC)
    (w.out / "lock").write_text("pid 1\n")
    assert main(w.train("--offload", "disk", "--offload-dir", str(tmp_path / "blocks"))) == 2
    assert "not the one this run started from" in capsys.readouterr().err
    assert not (tmp_path / "blocks").exists()
    assert sorted(p.name for p in w.out.iterdir()) == ["base.json", "lock", "steps.log"]


def test_a_new_run_starts_in_the_folder_of_a_run_killed_before_its_first_step(prepared, tiny_model_dir, tmp_path):
    """The run files of a run that took no step (here: killed while loading) are zotune's own: the same
    command starts again there. A folder with anything else in it is refused (the table above)."""
    w = World(tmp_path, prepared, tiny_model_dir)
    w.out.mkdir()
    (w.out / "steps.log").write_bytes(LOG_MAGIC)
    (w.out / "metrics.jsonl").write_text("")
    (w.out / "lock").write_text("pid 1\n")
    assert main(w.train()) == 0
    assert json.loads((w.out / "summary.json").read_text())["steps"] == 2
