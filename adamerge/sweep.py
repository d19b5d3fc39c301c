"""Hydra callback: after a multirun, one summary table (CSV + markdown) of every job's final metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for result in sorted(sweep_dir.glob("*/result.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit()
                         else p.parent.name):
        job = json.loads(result.read_text())
        row = {"job": result.parent.name, "overrides": " ".join(job.get("overrides", [])), "status": job["status"]}
        after = (job.get("metrics") or {}).get("after") or {}
        row.update({f"after/{k}": round(v, 4) for k, v in after.items()})
        row["seconds"] = round(job.get("seconds", 0.0), 1)
        row["error"] = job.get("error", "")
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = summary_rows(sweep_dir)
    if not rows:
        return rows
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
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
        failed = sum(r["status"] != "ok" for r in rows)
        print(f"sweep summary: {len(rows)} jobs, {failed} failed -> {sweep_dir / 'summary.md'}")
