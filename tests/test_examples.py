"""The files in examples/ stay valid: every run config and task file resolves to checked configs
(a renamed or removed option fails here, not in a user's first command)."""

from pathlib import Path

import pytest

from zotune.train import resolve_configs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_run_configs_resolve(path):
    cfgs = resolve_configs(path)
    assert cfgs["task"].template and cfgs["method"].name


@pytest.mark.parametrize("path", sorted((EXAMPLES / "tasks").glob("*.yaml")), ids=lambda p: p.name)
def test_task_files_resolve(path):
    assert resolve_configs(None, task=str(path))["task"].data


def test_the_probe_recipe_is_what_docs_compare_measured():
    cfgs = resolve_configs(EXAMPLES / "rotten_tomatoes_probe.yaml")
    assert cfgs["model"].trainable == "final-norm"
    assert cfgs["task"].template == "Review: {text}\nSentiment:"
    assert cfgs["task"].verbalizer == {"fresh": "positive", "rotten": "negative"}
    assert (cfgs["method"].name, cfgs["method"].lr, cfgs["run"].batch_size, cfgs["run"].steps) == ("zosgd", 0.2, 64, 3600)
