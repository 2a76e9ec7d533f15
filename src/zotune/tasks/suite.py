"""The task suite by name (`task.name=rte`): MeZO's eleven tasks with MeZO's prompts, and the prompts of
the built-in data sets. (A user's own task in YAML or Python, `--task my_task.yaml`: tasks/files.py.)

A suite task is the TaskConfig values it sets; a user's value for any option wins. The MeZO tasks
read the columns of the Hugging Face versions of their data (`glue`, `super_glue`, `squad`, `drop`),
so `task.data` is a file of those rows (e.g. `Dataset.to_json` of a split) or, online, `hf:...`
(the default). Derived fields that a plain template cannot express (COPA's connective, ReCoRD's
filled-in queries) come from the `prepare_*` functions below.
"""

from __future__ import annotations

_YES_NO = {"False": "No", "True": "Yes"}
_BOOL_NAMES = ["False", "True"]


def prepare_boolq(row: dict) -> dict:
    question = row["question"].strip()
    question = question[0].upper() + question[1:] if question else question
    return {**row, "question": question if question.endswith("?") else question + "?"}


def prepare_wsc(row: dict) -> dict:
    return {**row, "span2_lower": row["span2_text"].lower()}


def prepare_copa(row: dict) -> dict:
    """The premise with its connective ("because" for a cause, "so" for an effect), and candidates that
    continue the sentence (first word in lower case unless it is "I")."""
    premise = row["premise"].rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise
    if row["question"] not in ("cause", "effect"):
        raise ValueError(f"question is {row['question']!r}, not cause or effect")

    def continuing(choice: str) -> str:
        first, _, rest = choice.partition(" ")
        return " ".join(w for w in (first if first == "I" else first.lower(), rest) if w)

    return {**row, "premise_connective": premise + (" because" if row["question"] == "cause" else " so"),
            "choice1": continuing(row["choice1"]), "choice2": continuing(row["choice2"])}


def prepare_record(row: dict) -> dict:
    """The passage's highlights as a list, one candidate query per entity, the correct ones by index."""
    entities = list(dict.fromkeys(row["entities"]))
    answers = set(row.get("answers") or [])
    return {**row, "passage": row["passage"].replace("@highlight\n", "- "),
            "candidates": [row["query"].replace("@placeholder", e) for e in entities],
            "label": [i for i, e in enumerate(entities) if e in answers]}


_HERE = "zotune.tasks.suite"

SUITE: dict[str, dict] = {
    # The built-in data sets (offline)
    # (the Rotten Tomatoes prompt was chosen on dev: docs/tasks.md)
    "rotten_tomatoes": {"data": "rotten_tomatoes", "template": "Review: {text}\nSentiment:",
                        "verbalizer": {"fresh": "positive", "rotten": "negative"}},
    "bbc_news": {"data": "bbc_news", "template": "{text}\nTopic:",
                 "verbalizer": {"business": "business", "entertainment": "entertainment", "politics": "politics",
                                "sports": "sport", "tech": "technology"}},
    "tweets": {"data": "tweets", "template": "{text}\nThe sentiment of this tweet is",
               "verbalizer": {"negative": "negative", "neutral": "neutral", "positive": "positive"}},
    # MeZO's task set (Malladi et al. 2023, their templates.py prompts)
    "sst2": {"data": "hf:glue:sst2", "template": "{sentence} It was", "label_names": ["negative", "positive"],
             "verbalizer": {"negative": "terrible", "positive": "great"}},
    "rte": {"data": "hf:super_glue:rte", "template": '{premise}\nDoes this mean that "{hypothesis}" '
                                                     'is true? Yes or No?\n',
            "label_names": ["entailment", "not_entailment"],
            "verbalizer": {"entailment": "Yes", "not_entailment": "No"},
            "max_length": 256},
    "cb": {"data": "hf:super_glue:cb", "template": 'Suppose {premise} Can we infer that '
                                                   '"{hypothesis}"? Yes, No, or Maybe?\n',
           "label_names": ["entailment", "contradiction", "neutral"],
           "verbalizer": {"entailment": "Yes", "contradiction": "No", "neutral": "Maybe"}, "max_length": 256},
    "boolq": {"data": "hf:super_glue:boolq", "template": "{passage} {question}", "prepare": f"{_HERE}:prepare_boolq",
              "label_names": _BOOL_NAMES, "verbalizer": _YES_NO, "max_length": 512},
    "wsc": {"data": "hf:super_glue:wsc.fixed", "prepare": f"{_HERE}:prepare_wsc",
            "template": '{text}\nIn the previous sentence, does the pronoun "{span2_lower}" refer to '
                        '{span1_text}? Yes or No?\n',
            "label_names": _BOOL_NAMES, "verbalizer": _YES_NO},
    "wic": {"data": "hf:super_glue:wic",
            "template": 'Does the word "{word}" have the same meaning in these two sentences? Yes, '
                        'No?\n{sentence1}\n{sentence2}\n',
            "label_names": _BOOL_NAMES, "verbalizer": _YES_NO},
    "multirc": {"data": "hf:super_glue:multirc",
                "template": '{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that '
                            'correct? Yes or No?\n',
                "label_names": _BOOL_NAMES, "verbalizer": _YES_NO, "max_length": 512},
    "copa": {"type": "multiple_choice", "data": "hf:super_glue:copa", "prepare": f"{_HERE}:prepare_copa",
             "template": "{premise_connective}", "choices": ["{choice1}", "{choice2}"],
             "label_names": ["choice1", "choice2"]},
    "record": {"type": "multiple_choice", "data": "hf:super_glue:record", "prepare": f"{_HERE}:prepare_record",
               "template": "{passage}\n-", "choices": ["{candidates}"], "max_length": 512},
    "squad": {"type": "generation", "data": "hf:squad", "template": "Title: {title}\nContext: "
                                                                    "{context}\nQuestion: {question}\nAnswer:",
              "answer": "answers.text", "max_length": 512},
    "drop": {"type": "generation", "data": "hf:drop", "template": "Passage: {passage}\nQuestion: {question}\nAnswer:",
             "answer": "answers_spans.spans", "max_length": 512},
}
