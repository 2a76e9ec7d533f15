"""Multiple choice and generation: batched scoring against one-example references, batched greedy
decoding with the KV cache against decoding without it, SQuAD's metrics, ZO training on each type,
task files and their errors, and whole runs from the CLI (resident, streamed, resumed, evaluated)."""

import json

import pytest
import torch

from conftest import tiny_model
from zotune import ZOSGD
from zotune.cli import main
from zotune.config import ConfigError
from zotune.models import select_trainable
from zotune.tasks import ClassificationTask, GenerationTask, MultipleChoiceTask, Table, TaskConfig, load_task_file
from zotune.tasks.generation import exact_match, normalize_answer, token_f1

COLOURS = ["red", "green", "blue", "yellow"]
MC_ROWS = [{"question": f"Item {i} has the colour of {c}. Its colour is", "a": c, "b": COLOURS[(i + 1) % 4],
            "c": "a colour nobody has ever seen", "label": 0} for i, c in
           enumerate(COLOURS * 6)]
QA_ROWS = [{"context": f"The code word for day {i} is {w}.", "question": f"What is the code word for day {i}?",
            "answers": {"text": [w, w.upper()]}} for i, w in enumerate(["apple", "river stone", "blue", "ten", "cat",
                                                                        "open door", "sun", "moon"] * 3)]


def mc_task(tokenizer, **kw) -> MultipleChoiceTask:
    cfg = TaskConfig(type="multiple_choice", data="inline", template="{question}", choices=["{a}", "{b}", "{c}"],
                     n_dev=0, n_test=4, **kw)
    return MultipleChoiceTask(cfg, tokenizer, Table(MC_ROWS, "inline"))


def qa_task(tokenizer, **kw) -> GenerationTask:
    cfg = TaskConfig(type="generation", data="inline", template="{context}\nQuestion: {question}\nAnswer:",
                     answer="answers.text", n_dev=0, n_test=4, max_new_tokens=6, **kw)
    return GenerationTask(cfg, tokenizer, Table(QA_ROWS, "inline"))


def reference_logprob(model, tokenizer, prompt: str, answer: str) -> list[float]:
    """Log-probabilities of `answer`'s tokens after `prompt`, one unpadded sequence, the full head."""
    p = tokenizer(prompt)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([p + a])).logits[0].float().log_softmax(-1)
    return [float(logits[len(p) - 1 + j, t]) for j, t in enumerate(a)]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_candidate_scores_equal_one_sequence_at_a_time(family, tokenizer):
    model = tiny_model(family)
    task = mc_task(tokenizer)
    examples = task.train[:5]
    with torch.inference_mode():
        scores = task.scores(model, task.collate(examples))
    for b, (prompt, candidates, _) in enumerate(examples):
        for c, candidate in enumerate(candidates):
            expected = reference_logprob(model, tokenizer, prompt, " " + candidate)
            assert float(scores[b, c]) == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_candidates_of_different_numbers_batch_together(tokenizer):
    rows = [{"q": "Pick one:", "options": ["x", "y", "z"][: 2 + i % 2], "label": "y"} for i in range(12)]
    task = MultipleChoiceTask(TaskConfig(type="multiple_choice", data="x", template="{q}", choices=["{options}"],
                                         n_dev=0, n_test=2), tokenizer, Table(rows, "x"))
    batch = task.collate(task.train[:4])
    model = tiny_model("llama")
    with torch.inference_mode():
        scores = task.scores(model, batch)
    assert scores.shape == (4, 3) and all(e[2] == (1,) for e in task.train)  # "y" is the second candidate
    assert torch.isinf(scores).sum() == sum(len(e[1]) == 2 for e in task.train[:4])
    assert torch.isfinite(task.loss(model, batch))


def test_single_token_candidates_give_the_classification_loss(tokenizer):
    """Log-softmax over the vocabulary cancels in the cross-entropy over candidates: scoring the
    verbalizer words as candidates is the classification loss."""
    rows = [{"text": f"film {i} was {'wonderful' if i % 2 else 'awful'}",
             "label": "pos" if i % 2 else "neg"} for i in range(16)]
    classify = ClassificationTask(TaskConfig(data="x", verbalizer={"pos": "great", "neg": "terrible"}, n_dev=0,
                                             n_test=2),
                                  tokenizer, Table(rows, "x"))
    choose = MultipleChoiceTask(TaskConfig(type="multiple_choice", data="x", template="{text} It was",
                                           choices=["great", "terrible"], label_names=["pos", "neg"], n_dev=0,
                                           n_test=2),
                                tokenizer, Table(rows, "x"))
    model = tiny_model("qwen2")
    with torch.inference_mode():
        a = classify.loss(model, classify.collate(classify.train[:8]))
        b = choose.loss(model, choose.collate(choose.train[:8]))
    assert float(a) == pytest.approx(float(b), abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gemma", "gpt_neox"])
def test_teacher_forcing_and_batched_greedy_decoding_equal_references(family, tokenizer):
    model = tiny_model(family)
    task = qa_task(tokenizer)
    examples = task.train[:5]
    batch = task.collate(examples)
    with torch.inference_mode():
        loss = task.loss(model, batch)
        expected = [x for prompt, answers in examples
                    for x in reference_logprob(model, tokenizer, prompt, " " + answers[0] + "\n")]
        assert float(loss) == pytest.approx(-sum(expected) / len(expected), abs=1e-5)
        answers = task.generate(model, batch)  # left-padded, KV cache, stops early
        assert task.generate(model, batch, lockstep=True) == answers  # ranks decoding in lockstep: the same answers
        for (prompt, _), answer in zip(examples, answers):  # one prompt at a time, no cache, no padding
            ids = tokenizer(prompt)["input_ids"]
            new = []
            for _ in range(task.cfg.max_new_tokens):
                token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(token)
                if token == tokenizer.eos_token_id or "\n" in tokenizer.decode(new):
                    break
            assert answer == tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()


def test_decoding_a_prefix_tuned_model_reruns_the_sequence_and_equals_the_reference(tokenizer):
    """PEFT's prefix tuning rebuilds the cache on every call: the decoder reruns prompt + answer."""
    from zotune.adapters import AdapterConfig, apply_adapter

    model, _ = apply_adapter(tiny_model("llama"), AdapterConfig(kind="prefix", tokens=3), seed=0)
    task = qa_task(tokenizer)
    examples = task.train[:4]
    with torch.inference_mode():
        answers = task.generate(model, task.collate(examples))
        for (prompt, _), answer in zip(examples, answers):
            ids, new = tokenizer(prompt)["input_ids"], []
            for _ in range(task.cfg.max_new_tokens):
                x = torch.tensor([ids + new])
                new.append(int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
                if new[-1] == tokenizer.eos_token_id or "\n" in tokenizer.decode(new):
                    break
            assert answer == tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()


def test_squad_answer_metrics():
    assert normalize_answer("The  Eiffel tower!") == "eiffel tower"
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert token_f1("Eiffel tower in Paris", "the Eiffel Tower") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("a", "b") == 0.0


@pytest.mark.parametrize("kind", ["multiple_choice", "generation"])
def test_zo_lowers_the_training_loss_of_each_type(kind, tokenizer):
    model = tiny_model("llama")
    task = mc_task(tokenizer) if kind == "multiple_choice" else qa_task(tokenizer)
    params = [p for _, p in select_trainable(model, "last-blocks:1")]
    opt = ZOSGD(params, lr=5e-2, eps=1e-3, seed=0)
    batch = task.collate(task.train[:8])

    def loss():
        with torch.inference_mode(), task.head(model, batch):
            return task.head_loss(model, batch)

    start = float(loss())
    for _ in range(60):
        opt.step(loss)
    assert float(loss()) < start - 0.05


def test_a_decoding_objective_trains_on_generated_answers(tokenizer):
    task = qa_task(tokenizer, objective="f1")
    assert not task.fixed_inputs  # probes feed the model its own tokens: no frozen-prefix reuse
    model = tiny_model("llama")
    batch = task.collate(task.train[:4])
    with torch.inference_mode():
        value = float(task.loss(model, batch))
        predictions = task.generate(model, batch)
    assert value == pytest.approx(1 - sum(max(token_f1(p, g) for g in a) for p, (_, a) in zip(predictions,
                                                                                              task.train[:4])) / 4)


# -- the suite by name --------------------------------------------------------------------------------
SUITE_ROWS = {
    "sst2": {"sentence": "a gripping film ", "label": 1},
    "rte": {"premise": "Cats sleep.", "hypothesis": "Cats rest.", "label": "entailment"},
    "cb": {"premise": "It rained.", "hypothesis": "The ground is wet.", "label": 2},
    "boolq": {"passage": "Water boils at 100 C.", "question": "does water boil at 100 c", "label": True},
    "wsc": {"text": "Mark told Pete he was late.", "span1_text": "Pete", "span2_text": "He", "label": False},
    "wic": {"word": "bank", "sentence1": "A river bank.", "sentence2": "A bank loan.", "label": 0},
    "multirc": {"paragraph": "Tom has two dogs.", "question": "How many dogs?", "answer": "Two", "label": 1},
    "copa": {"premise": "The man broke his toe.", "question": "cause", "choice1": "He dropped a hammer on his foot.",
             "choice2": "I got a hole in my sock.", "label": 0},
    "record": {"passage": "Rain in Paris.\n@highlight\nParis is wet", "query": "@placeholder stayed dry.",
               "entities": ["Paris", "London", "Paris"], "answers": ["London"]},
    "squad": {"title": "Tower", "context": "The tower is 300 m tall.", "question": "How tall?",
              "answers": {"text": ["300 m", "300 m tall"], "answer_start": [13, 13]}},
    "drop": {"passage": "Two goals, then three.", "question": "How many goals?",
             "answers_spans": {"spans": ["5"], "types": ["number"]}},
}
EXPECTED = {
    "sst2": ("a gripping film  It was", "positive"),
    "rte": ('Cats sleep.\nDoes this mean that "Cats rest." is true? Yes or No?\n', "entailment"),
    "cb": ('Suppose It rained. Can we infer that "The ground is wet."? Yes, No, or Maybe?\n', "neutral"),
    "boolq": ("Water boils at 100 C. Does water boil at 100 c?", "True"),
    "wsc": ('Mark told Pete he was late.\nIn the previous sentence, does the pronoun "he" refer to Pete? '
            'Yes or No?\n', "False"),
    "wic": ('Does the word "bank" have the same meaning in these two sentences? Yes, No?\nA river bank.\n'
            'A bank loan.\n', "False"),
    "multirc": ('Tom has two dogs.\nQuestion: How many dogs?\nI found this answer "Two". Is that correct? '
                'Yes or No?\n', "True"),
    "copa": ("The man broke his toe because", ("he dropped a hammer on his foot.", "I got a hole in my sock."), (0,)),
    "record": ("Rain in Paris.\n- Paris is wet\n-", ("Paris stayed dry.", "London stayed dry."), (1,)),
    "squad": ("Title: Tower\nContext: The tower is 300 m tall.\nQuestion: How tall?\nAnswer:", ("300 m", "300 m tall")),
    "drop": ("Passage: Two goals, then three.\nQuestion: How many goals?\nAnswer:", ("5",)),
}


@pytest.mark.parametrize("name", sorted(SUITE_ROWS))
def test_the_mezo_suite_runs_by_name_on_files_of_its_rows(name, tmp_path, tokenizer):
    path = tmp_path / f"{name}.jsonl"
    path.write_text((json.dumps(SUITE_ROWS[name]) + "\n") * 3)  # a train split beside the one test example
    cfg = TaskConfig(name=name, data=str(path), n_test=1, n_dev=0)
    from zotune.tasks import load_rows, make_task

    table = load_rows(str(path))
    task = make_task(cfg, tokenizer, table)
    assert task.test[0] == EXPECTED[name]
    assert len(task.collate(task.test))


def test_the_suite_defaults_to_hugging_face_data_and_says_what_to_do_offline(monkeypatch):
    assert TaskConfig(name="rte").data == "hf:super_glue:rte" and TaskConfig(name="squad").type == "generation"
    with pytest.raises(ConfigError, match=r"task.name='mnli' is not a suite task; choose from .*rte"):
        TaskConfig(name="mnli")
    # yours wins
    assert TaskConfig(name="rte", template="{premise} ? {hypothesis}").template == "{premise} ? {hypothesis}"
    with pytest.raises(ConfigError, match="task.name=copa is a multiple_choice task; drop task.type=generation"):
        TaskConfig(name="copa", type="generation")
    generation = TaskConfig(data="rotten_tomatoes", type="generation", template="{text} Verdict:", answer="label")
    # the data set's prompt is for classification
    assert generation.verbalizer == {} and generation.template == "{text} Verdict:"


# -- task files ------------------------------------------------------------------------------------------
def test_yaml_and_python_task_files(tmp_path, tokenizer):
    (tmp_path / "t.yaml").write_text("type: multiple_choice\ntemplate: '{question}'\nchoices: ['{a}', '{b}']\n"
                                     "n_test: 2\nn_dev: 0\n")
    values = load_task_file(str(tmp_path / "t.yaml"))
    assert values["choices"] == ["{a}", "{b}"]
    (tmp_path / "t.py").write_text("def prepare(row):\n    return {**row, 'q': row['question'].upper()}\n"
                                   "TASK = dict(type='multiple_choice', template='{q}', choices=['{a}', "
                                   "'{b}'], prepare=prepare)\n")
    values = load_task_file(str(tmp_path / "t.py"))
    assert values["prepare"] == f"{tmp_path / 't.py'}:prepare"
    task = MultipleChoiceTask(TaskConfig(data="x", n_test=2, n_dev=0, **values), tokenizer, Table(MC_ROWS, "x"))
    assert task.train[0][0] == task.train[0][0].upper()


@pytest.mark.parametrize("text,match", [
    ("type: classification\ntemplate: '{text}'\nverbaliser: {a: b}\n", r"t.yaml:3: unknown task option 'verbaliser'"),
    ("type: classification\nverbalizer: {pos: '', neg: bad}\n", r"label 'pos' an empty word"),
    ("type: generation\ntemplate: 'Q: {question}'\ndata: qa.jsonl\n", r"task.answer is needed for a generation task"),
    ("type: generation\ntemplate: 'Q: {question}'\nanswer: a\n", r"task.data is needed for a generation task"),
    ("type: multiple_choice\ndata: x.csv\ntemplate: '{question}'\nchoices: ['{a}']\nverbalizer: {a: b}\n",
     r"task.verbalizer is not used by a multiple_choice task"),
    ("template: '{text'\nverbalizer: {a: b, c: d}\n", r"is not a valid template"),
])
def test_bad_task_files_name_the_file_line_or_field(tmp_path, text, match):
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        TaskConfig(**load_task_file(str(tmp_path / "t.yaml")))


def test_bad_rows_name_the_file_line_and_field(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "a", "answer": "x"}\n{"question": "b"}\n')
    from zotune.tasks import load_rows

    cfg = TaskConfig(type="generation", data=str(path), template="Q: {question}\nA:", answer="answer", n_test=1,
                     n_dev=0)
    with pytest.raises(ConfigError, match=r"qa.jsonl:2: no column 'answer' \(has: question\)"):
        GenerationTask(cfg, tokenizer, load_rows(str(path)))
    cfg = TaskConfig(type="generation", data=str(path), template="Q: {questio}\nA:", answer="answer", n_test=1, n_dev=0)
    with pytest.raises(ConfigError, match=r"qa.jsonl:1: task.template field \{questio\} is not in the row"):
        GenerationTask(cfg, tokenizer, load_rows(str(path)))
    path.write_text('{"q": "a", "options": ["x", "y"], "label": 5}\n')
    cfg = TaskConfig(type="multiple_choice", data=str(path), template="{q}", choices=["{options}"], n_test=1, n_dev=0)
    with pytest.raises(ConfigError, match=r"qa.jsonl:1: label 5 names no candidate"):
        MultipleChoiceTask(cfg, tokenizer, load_rows(str(path)))


# -- whole runs --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))
    return path


def qa_args(model_dir, data, out, *extra, steps=4):
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "task.type=generation", "task.template=Context: {context}\nQuestion: {question}\nAnswer:",
            "task.answer=answers.text", "task.max_new_tokens=4", "task.n_test=6", "task.n_dev=4",
            "run.eval_every=2", "run.batch_size=4", "method.lr=1e-2", "--trainable", "last-blocks:1", *extra]


def test_a_generation_run_streams_resumes_and_evaluates_like_a_resident_one(tiny_model_dir, qa_file, tmp_path):
    assert main(qa_args(tiny_model_dir, qa_file, tmp_path / "resident")) == 0
    resident = json.loads((tmp_path / "resident" / "summary.json").read_text())
    assert resident["after"]["metric"] == "f1" and {"f1", "exact_match", "loss"} <= set(resident["after"])
    rows = [json.loads(line) for line in (tmp_path / "resident" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev_f1" in r] == [0, 2, 4] and "test_f1" in rows[0]

    assert main(qa_args(tiny_model_dir, qa_file, tmp_path / "streamed", "--offload", "cpu")) == 0
    streamed = json.loads((tmp_path / "streamed" / "summary.json").read_text())
    assert streamed["after"] == resident["after"] and streamed["before"] == resident["before"]

    assert main(qa_args(tiny_model_dir, qa_file, tmp_path / "part", steps=2)) == 0
    assert main(["resume", str(tmp_path / "part"), "run.steps=4"]) == 0
    resumed = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert resumed["after"] == resident["after"]

    assert main(["eval", "--model", str(tmp_path / "resident"), "--split", "test"]) == 0
    evaluated = json.loads((tmp_path / "resident" / "eval.json").read_text())
    assert evaluated["splits"]["test"] == resident["after"]


def test_a_multiple_choice_task_file_trains_from_the_cli(tiny_model_dir, tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (tmp_path / "mc.yaml").write_text(f"type: multiple_choice\ndata: {data}\ntemplate: '{{question}}'\n"
                                      f"choices: ['{{a}}', '{{b}}', '{{c}}']\nn_test: 6\nn_dev: 4\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--task", str(tmp_path / "mc.yaml"), "--out", str(out),
                 "--steps", "3", "run.batch_size=4", "run.eval_every=0", "--trainable", "last-blocks:1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["metric"] == "accuracy" and summary["after"]["n"] == 6
    config = (out / "config.yaml").read_text()
    assert "multiple_choice" in config and "{a}" in config  # the run folder holds the task itself, not the file's name


def test_two_ranks_train_and_decode_a_generation_task_like_one(tiny_model_dir, qa_file, tmp_path):
    """Perturbation parallel: the step log is bit for bit one process's; evaluation is split over the
    ranks, which decode in lockstep, and the counts summed."""
    from test_parallel import launch, wait_all

    extra = ["run.device=cpu", "run.threads=1"]
    assert main(qa_args(tiny_model_dir, qa_file, tmp_path / "one", *extra)) == 0
    argv = qa_args(tiny_model_dir, qa_file, tmp_path / "two", *extra, "parallel.perturb=2")
    assert wait_all(launch(2, argv, tmp_path)) == [0, 0]
    assert (tmp_path / "two" / "steps.log").read_bytes() == (tmp_path / "one" / "steps.log").read_bytes()
    one, two = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    for split in ("before", "after"):
        assert two[split]["n"] == one[split]["n"] and two[split]["exact_match"] == one[split]["exact_match"]
        assert two[split]["f1"] == pytest.approx(one[split]["f1"])
        assert two[split]["loss"] == pytest.approx(one[split]["loss"])
