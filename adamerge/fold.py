"""``adamerge fold OUTPUT_DIR --output NEW_DIR``: fold a run's saved coefficients again, without training.

Reads ``adamerge_config.yaml`` and ``adamerge_coefficients.safetensors`` from a folded checkpoint,
rebuilds the pool and task vectors from the recorded sources, loads the coefficients as they were
learned (transform already applied) and writes a new folded checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from adamerge.errors import AdamergeError
from adamerge.export import COEFFICIENTS_FILE, CONFIG_FILE
from adamerge.granularity import GRANULARITIES, Granularity
from adamerge.merged import MergedModel
from adamerge.objectives import OBJECTIVES, Objective
from adamerge.run import RunResult, build_pool, build_task_vectors, construct, write_output


def refold(source: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    source = Path(source)
    if not (source / CONFIG_FILE).is_file() or not (source / COEFFICIENTS_FILE).is_file():
        raise AdamergeError(f"{str(source)!r} has no {CONFIG_FILE} and {COEFFICIENTS_FILE}: not an adamerge output")
    config = yaml.safe_load((source / CONFIG_FILE).read_text())
    saved = load_file(str(source / COEFFICIENTS_FILE))
    own_state = (Granularity.state_prefix, Objective.state_prefix)  # tensors besides the coefficients
    table = {k: v for k, v in saved.items() if not k.startswith(own_state)}
    pool = build_pool(config["pool"])
    task_vectors = build_task_vectors(pool, config["pool"], int(config.get("seed", 0)))
    stage1_keys = ("budget", "budget_per_tensor", "stage1_steps")  # Expert Merging++'s allocation: counts are saved
    gran_cfg = {k: v for k, v in config["granularity"].items() if k not in stage1_keys}
    gran_cfg["transform"] = "identity"  # the saved coefficients are already transformed
    if gran_cfg["name"] == "chunk":
        gran_cfg["counts"] = {name: t.shape[1] for name, t in table.items()}
    merged = MergedModel(pool.base, task_vectors, construct(GRANULARITIES, "granularity", gran_cfg))
    merged.granularity.load_state_tensors(saved)  # aTLAS's partition masks
    objective = construct(OBJECTIVES, "objective", config["objective"])
    objective.load_state_tensors(merged, saved)  # DOGE: the adjusted task vectors
    merged.granularity.load_table(table)
    config = {**config, "output_dir": str(output_dir), "overwrite": overwrite}
    write_output(merged, pool, objective, config,
                 RunResult(Path(output_dir), {}, merged.granularity.table(), None))
    return Path(output_dir)


def main(argv: list[str] | None = None) -> int:
    description = ("Fold the coefficients saved in an adamerge output directory into a new checkpoint, without "
                   "training (e.g. after moving the experts).")
    parser = argparse.ArgumentParser(prog="adamerge fold", description=description)
    parser.add_argument("source", metavar="OUTPUT_DIR",
                        help="a folded checkpoint written by adamerge (its output_dir: holds the coefficients)")
    parser.add_argument("--output", required=True, metavar="NEW_DIR", help="where to write the new folded checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args = parser.parse_args(argv)
    try:
        print(refold(args.source, args.output, args.overwrite))
    except AdamergeError as e:
        print(f"adamerge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
