"""The package's import graph has no cycle: data flows one way (docs/ARCHITECTURE.md), and a module
never needs another that needs it, not even through an import inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adamerge"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    modules = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def imported(tree: ast.AST) -> set[str]:
    """Every dotted name an ``import`` or ``from ... import`` anywhere in the tree may load (a name imported
    from a package may be its submodule)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"relative import of {node.module!r}: adamerge imports absolutely"
            names.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
    return names


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {m: {n for n in imported(ast.parse(f.read_text())) if n in modules and n != m} for m, f in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None (depth-first, three colours)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_acyclic():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found():
    """The check itself: a function-local import closing a loop counts."""
    graph = {m: set() for m in ("a", "b", "c")}
    graph["a"].add("b")
    graph["b"].add("c")
    assert find_cycle(graph) is None
    graph["c"].update(n for n in imported(ast.parse("def f():\n    from a import x\n")) if n in graph)
    assert find_cycle(graph) == ["a", "b", "c", "a"]


# ---- a static merge never imports the trainer ----------------------------------------------------------------

TRAINER_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "adamerge.training", "adamerge.checkpointing",
                   "adamerge.datamodule", "adamerge.progress")

CLI_THEN_MODULES = """
import json, sys
from adamerge.__main__ import main
main()
print(json.dumps(sorted(sys.modules)))
"""


def test_a_static_merge_imports_no_lightning(tmp_path):
    """``python -m adamerge method=task_arithmetic ...`` (no data, the default CSV logger): the whole CLI run, in a
    fresh process, writes the checkpoint and its CSV log without importing Lightning or the trainer's modules."""
    import json
    import os
    import subprocess
    import sys

    from tiny import write_zoo

    zoo = write_zoo(tmp_path / "zoo", rows=2)
    experts = [f"pool.experts.{task}={path}" for task, path in zoo.experts.items()]
    args = ["method=task_arithmetic", f"pool.base={zoo.base}", *experts, f"output_dir={tmp_path / 'merged'}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CLI_THEN_MODULES, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert list((tmp_path / "run" / "logs").glob("version_0/hparams.yaml"))
    assert "adamerge.run" in modules and "torch" in modules  # the run happened in this process
    assert not [m for m in modules if m.split(".")[0] in TRAINER_MODULES or m in TRAINER_MODULES]


def test_static_csv_log_writes_what_lightnings_csv_logger_writes(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    from adamerge.loggers import StaticCSVLogger, test_metrics

    config = {"pool": {"base": "b", "experts": {"add": "x", "rev": None}}, "seed": 3, "granularity": {"name": "task"}}
    scores = test_metrics({"before": {"add": 0.25, "avg": 0.25}, "after": {"add": 0.5, "avg": 0.5}})
    ours, theirs = StaticCSVLogger(tmp_path / "ours"), CSVLogger(save_dir=str(tmp_path / "lightning"), name="logs")
    for logger in (ours, theirs):
        logger.log_hyperparams(config)
        logger.log_metrics(scores, step=7)
        logger.save()
    for name in ("hparams.yaml", "metrics.csv"):
        assert (ours.log_dir / name).read_bytes() == (Path(theirs.log_dir) / name).read_bytes(), name
    assert StaticCSVLogger(tmp_path / "ours").log_dir.name == "version_1"  # the next run's, as Lightning numbers them
