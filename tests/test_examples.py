"""The files in examples/ stay valid: every run config and task file resolves to checked configs
(a renamed or removed option fails here, not in a user's first command)."""

from pathlib import Path

import pytest

from zotune.resolve import resolve_configs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_run_configs_resolve(path):
    cfgs = resolve_configs(path)
    assert cfgs["task"].template and cfgs["method"].name


@pytest.mark.parametrize("path", sorted((EXAMPLES / "tasks").glob("*.yaml")), ids=lambda p: p.name)
def test_task_files_resolve(path):
    assert resolve_configs(None, task=str(path))["task"].data


def test_the_blocks_example_is_the_former_default_job():
    """docs/compare.md's block-training figures (0.720 / 0.714 / 0.702) were measured with these settings."""
    cfgs = resolve_configs(EXAMPLES / "rotten_tomatoes_blocks.yaml")
    assert cfgs["model"].trainable == "last-blocks:2"
    assert (cfgs["task"].template, cfgs["task"].verbalizer) == ("{text} It was",
                                                                {"fresh": "great", "rotten": "terrible"})
    method, run = cfgs["method"], cfgs["run"]
    got = (method.name, method.lr, method.rank, method.interval, run.batch_size, run.steps)
    assert got == ("lozo", 2.5e-4, 2, 50, 16, 1200)
