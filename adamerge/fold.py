"""``adamerge fold OUTPUT_DIR --output NEW_DIR``: fold a run's saved coefficients again, without training.

Reads ``adamerge_config.yaml`` and ``adamerge_coefficients.safetensors`` from a folded checkpoint,
rebuilds the pool and task vectors from the recorded sources (a closed-form run's pieces from its
calibration data again), loads the coefficients as they were learned (transform already applied) and
writes a new folded checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from adamerge.building import build_datamodule, max_positions
from adamerge.checks import protected_inputs
from adamerge.closed_form import closed_form_merge, closed_form_options
from adamerge.errors import AdamergeError
from adamerge.export import COEFFICIENTS_FILE, CONFIG_FILE, MARKER_KEY, check_output_dir
from adamerge.fingerprint import changed_inputs
from adamerge.granularity import GRANULARITIES, Granularity
from adamerge.loading import build_pool, build_task_vectors, build_tokenizer, is_causal, load_calibration
from adamerge.merged import MergedModel
from adamerge.objectives import OBJECTIVES, Objective
from adamerge.options import construct
from adamerge.pool import ExpertPool, read_json_object
from adamerge.taskvectors import TaskVectors
from adamerge.terminal import quiet
from adamerge.writing import RunResult, write_output

log = logging.getLogger(__name__)


def read_run_config(source: Path) -> tuple[dict, dict]:
    """The run's config and the record under the output marker (card details, input fingerprints), read as
    plain YAML data: an empty file, a non-mapping or a YAML tag is refused with one line."""
    if not (source / CONFIG_FILE).is_file() or not (source / COEFFICIENTS_FILE).is_file():
        raise AdamergeError(f"{str(source)!r} has no {CONFIG_FILE} and {COEFFICIENTS_FILE}: not an adamerge output")
    try:
        config = yaml.safe_load((source / CONFIG_FILE).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise AdamergeError(f"{str(source / CONFIG_FILE)!r} is not plain YAML data: {str(e).splitlines()[0]}") from e
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("pool", "granularity",
                                                                                          "objective")):
        raise AdamergeError(f"{str(source / CONFIG_FILE)!r} is not an adamerge run config (a mapping with pool, "
                            "granularity and objective)")
    record = config.pop(MARKER_KEY, None)
    return config, record if isinstance(record, dict) else {}


def check_inputs_unchanged(record: dict, pool_cfg: dict, force: bool) -> None:
    """The sources must be the files the coefficients were learned on (fingerprints recorded by the run)."""
    changed = changed_inputs(record.get("inputs") or {}, pool_cfg.get("base"), pool_cfg.get("experts") or {})
    if not changed:
        return
    message = f"changed since the run that learned these coefficients: {'; '.join(changed)}"
    if not force:
        raise AdamergeError(f"{message}; refolding would give another model (pass --force to fold them anyway)")
    log.warning("%s; folding them anyway (--force)", message)


def closed_form_again(task_vectors: TaskVectors, pool: ExpertPool, config: dict, objective: Objective
                      ) -> TaskVectors:
    """A closed-form run's pieces (``closed_form.method``) computed again from the run's calibration data:
    the same rows in the same order give the same statistics (the data files are not fingerprinted)."""
    causal = is_causal(pool)
    tokenizer = build_tokenizer(pool, bool(config["pool"].get("trust_remote_code")))
    rows = load_calibration(config.get("data") or {}, pool.expert_names, objective, causal)
    data = build_datamodule(config.get("data") or {}, rows, tokenizer, objective, causal, int(config.get("seed", 0)),
                            max_positions(pool.base), getattr(getattr(pool.base, "config", None), "bos_token_id", None))
    return closed_form_merge(task_vectors, pool.base, config, data, tokenizer)


def refold(source: str | Path, output_dir: str | Path, overwrite: bool = False, force: bool = False) -> Path:
    """Fold ``source``'s coefficients into ``output_dir``; the model card is the run's, plus a refold line."""
    source = Path(source)
    config, record = read_run_config(source)
    pool_cfg = config["pool"]
    protected = protected_inputs(config, {"the source output": source})
    check_output_dir(output_dir, overwrite, protected)
    check_inputs_unchanged(record, pool_cfg, force)
    try:
        saved = load_file(str(source / COEFFICIENTS_FILE))
    except (SafetensorError, OSError) as e:
        raise AdamergeError(f"{str(source / COEFFICIENTS_FILE)!r} is damaged: {e}") from e
    own_state = (Granularity.state_prefix, Objective.state_prefix)  # tensors besides the coefficients
    table = {k: v for k, v in saved.items() if not k.startswith(own_state)}
    pool = build_pool(config["pool"])
    task_vectors = build_task_vectors(pool, config["pool"], int(config.get("seed", 0)))
    objective = construct(OBJECTIVES, "objective", config["objective"])
    if closed_form_options(config.get("closed_form")).enabled:
        task_vectors = closed_form_again(task_vectors, pool, config, objective)
    stage1_keys = ("budget", "budget_per_tensor", "stage1_steps")  # Expert Merging++'s allocation: counts are saved
    gran_cfg = {k: v for k, v in config["granularity"].items() if k not in stage1_keys}
    gran_cfg["transform"] = "identity"  # the saved coefficients are already transformed
    if gran_cfg["name"] == "chunk":
        gran_cfg["counts"] = {name: t.shape[1] for name, t in table.items()}
    merged = MergedModel(pool.base, task_vectors, construct(GRANULARITIES, "granularity", gran_cfg))
    merged.granularity.load_state_tensors(saved)  # aTLAS's partition masks
    objective.load_state_tensors(merged, saved)  # DOGE: the adjusted task vectors
    merged.granularity.load_table(table)
    config = {**config, "output_dir": str(output_dir), "overwrite": overwrite}
    details = record.get("details")
    if isinstance(details, dict):
        details = {k: v for k, v in details.items() if k != "trust_remote_code"}
        details["refolded"] = f"from {source.resolve()} on {datetime.date.today()} (adamerge fold)"
    result = RunResult(Path(output_dir), read_json_object(source / "metrics.json"), merged.granularity.table(),
                       (details or {}).get("fold max |diff| (logits)"))
    write_output(merged, pool, objective, config, result, protected, details if isinstance(details, dict) else None)
    return Path(output_dir)


def main(argv: list[str] | None = None) -> int:
    description = ("Fold the coefficients saved in an adamerge output directory into a new checkpoint, without "
                   "training (e.g. after moving the experts).")
    parser = argparse.ArgumentParser(prog="adamerge fold", description=description)
    parser.add_argument("source", metavar="OUTPUT_DIR",
                        help="a folded checkpoint written by adamerge (its output_dir: holds the coefficients)")
    parser.add_argument("--output", required=True, metavar="NEW_DIR", help="where to write the new folded checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output if it is empty or an earlier adamerge output (never anything else)")
    parser.add_argument("--force", action="store_true", help="fold even if the base or an expert changed on disk")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' info lines and progress bars")
    args = parser.parse_args(argv)
    quiet(args.verbose)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s", stream=sys.stderr, force=True)
    try:
        print(refold(args.source, args.output, args.overwrite, args.force))
    except AdamergeError as e:
        print(f"adamerge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
