"""Gradient vs evolutionary search of task-wise coefficients on the shipped LM zoo, on identical ground.

One ``+experiment=quickstart`` comparison (same pool, task vectors, test sets, interval and timing) with
AdaMerging task-wise as the quickstart runs it (entropy on the unlabeled calibration prompts, 40 Adam
steps) and ``method=evolutionary_task`` (CMA-ES, exact match on a reduced labeled dev set). The dev set is
the calibration prompts with their answers (the zoo's ``calib`` split before ``unlabeled``): the inputs
AdaMerging sees, plus the labels an evolutionary fitness needs; the test split stays unseen by both.

    .venv/bin/python benchmarks/evolutionary_vs_gradient.py [OVERRIDE ...]   (1 to 3 min on 2 CPU cores)

Extra overrides apply to the evolutionary row (``method=evolutionary_layer``, ``search.subset=null``, ...).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: tiny models gain nothing from threads

from adamerge.zoo import EXPERT_TASKS, build_zoo, make_splits  # noqa: E402
from adamerge.zoo.tasks import write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def labeled_calibration(out: Path, settings) -> dict[str, Path]:
    """The zoo's calibration prompts with their answers, one JSONL per task (checked against the shipped prompts)."""
    paths = {}
    zoo = build_zoo()
    for name, task in EXPERT_TASKS.items():
        sizes = {"calib": settings["n_calib"], "train": settings["n_train"]}
        rows = make_splits(task, sizes, settings["seed"])["calib"]
        shipped = [json.loads(line)["prompt"] for line in Path(zoo.calib[name]).read_text().splitlines()]
        if [r["prompt"] for r in rows] != shipped:
            raise SystemExit(f"task {name}: the regenerated calibration prompts differ from the shipped ones")
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], rows)
    return paths


def main(extra: list[str]) -> None:
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from adamerge.compare import compare
    from adamerge.resolvers import register_resolvers

    settings = json.loads((ROOT / "data" / "zoo" / "zoo.json").read_text())["settings"]
    register_resolvers()
    with tempfile.TemporaryDirectory() as tmp:
        dev = labeled_calibration(Path(tmp) / "dev", settings)
        ada = ["method=adamerging_task", "objective.positions=generated", "trainer.max_steps=40",
               "trainer.accumulate_grad_batches=1", "optim.lr=0.01"]  # as the quickstart runs it
        method = next((o for o in extra if o.startswith("method=")), "method=evolutionary_task")
        others = [o for o in extra if o != method]
        evo = [method, *(f"++search.dev.{t}={p}" for t, p in dev.items()), *others]
        job = ["+experiment=quickstart", "output_dir=null"]
        with initialize_config_module("adamerge.conf", version_base=None):
            cfg = compose("config", overrides=job)
            with open_dict(cfg):
                cfg.compare = {"methods": [{"name": "AdaMerging task-wise", "overrides": ada},
                                           {"name": " ".join([method, *others]), "overrides": evo}]}
            run_dir = Path(tmp) / "run"
            run_dir.mkdir()
            compare(cfg, run_dir, compose=lambda overrides: compose("config", overrides=[*job, *overrides]))


if __name__ == "__main__":
    main(sys.argv[1:])
