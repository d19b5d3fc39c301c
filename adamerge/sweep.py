"""Hydra callback: after a multirun, one summary table (``summary.csv`` + ``summary.md``) of every job.

A row per job (a method comparison job: a row per method) with its final test scores in percent
(average first, then each task), the merged model's lm-eval harness scores (``harness/TASK/METRIC``, as
lm-eval reports them), its wall seconds and its overrides, best average first; failed
jobs come last with their error. Jobs are read back from their ``result.json``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from adamerge.harness import summary_columns

NOT_SCORES = ("time (s)", "norm. avg")


def percent(scores: dict[str, float]) -> dict[str, float]:
    """Scores in [0, 1] as percent with one decimal, ``avg`` first."""
    ordered = {"avg": scores["avg"], **scores} if "avg" in scores else scores
    return {k: round(100 * v, 1) for k, v in ordered.items() if k not in NOT_SCORES and isinstance(v, int | float)}


def job_rows(job: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row for a single run; one per method (the base and experts included) for a comparison."""
    common = {"job": job, "status": result["status"]}
    tail = {"seconds": round(result.get("seconds", 0.0), 1), "overrides": " ".join(result.get("overrides", [])),
            "error": result.get("error", "")}
    if result.get("table"):
        return [{**common, "method": name, **percent(row), **tail, "seconds": round(row.get("time (s)", 0.0), 1)}
                for name, row in result["table"].items()]
    metrics = result.get("metrics") or {}
    harness = summary_columns((metrics.get("harness") or {}).get("after") or {})  # lm-eval's numbers, as reported
    return [{**common, **percent(metrics.get("after") or {}), **harness, **tail}]


def job_order(result: Path) -> tuple[int, str]:
    name = result.parent.name
    return (int(name), "") if name.isdigit() else (1 << 30, name)


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's rows, best ``avg`` first; jobs without scores (failed, or no ``eval.tests``) last."""
    rows = [row for result in sorted(sweep_dir.glob("*/result.json"), key=job_order)
            for row in job_rows(result.parent.name, json.loads(result.read_text()))]
    return sorted(rows, key=lambda row: -row["avg"] if "avg" in row else float("inf"))


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = summary_rows(sweep_dir)
    if not rows:
        return rows
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if not any(row.get("error") for row in rows):
        columns.remove("error")
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        failed = len({row["job"] for row in rows if row["status"] != "ok"})
        jobs = len({row["job"] for row in rows})
        print(f"sweep summary: {jobs} jobs, {failed} failed -> {sweep_dir / 'summary.md'}")
