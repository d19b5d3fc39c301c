"""Every check that needs no model, run before the first one is loaded: bad input costs milliseconds and
writes nothing (config keys and numbers, expert names, the objective, ``output_dir``, data files, ``resume=``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from adamerge.closed_form import check_closed_form
from adamerge.errors import AdamergeError
from adamerge.export import check_output_dir
from adamerge.frank_wolfe import check_frank_wolfe
from adamerge.granularity import GRANULARITIES
from adamerge.harness import HarnessOptions, harness_options
from adamerge.loading import is_causal, load_calibration, load_test_sets
from adamerge.lora_output import output_options
from adamerge.masks import build_mask
from adamerge.objectives import OBJECTIVES, Objective
from adamerge.options import construct, parse_offload
from adamerge.pool import ExpertPool, is_local
from adamerge.publish import hub_options
from adamerge.resume import read_resume
from adamerge.search import SearchOptions, load_dev_rows, search_options
from adamerge.sensitivity import require_data
from adamerge.sharding import check_shard
from adamerge.validate import check_known_keys, check_numbers, check_task_names


def needs_calibration(config: Mapping, objective: Objective, search: SearchOptions | None = None) -> bool:
    """Training (or a search whose fitness is the objective) needs the objective's data; a static merge
    (``max_steps=0``) uses data only if given (then for the fold check), so task arithmetic, TIES, ... run data-free."""
    steps = int((config.get("trainer") or {}).get("max_steps", 0))
    optimized = steps > 0 or (search is not None and search.fitness == "objective")
    return objective.needs_data and (optimized or bool((config.get("data") or {}).get("paths")))


def protected_inputs(config: Mapping, others: Mapping[str, Path]) -> dict[str, Path]:
    """What ``output_dir`` must never be or contain (role -> path): local models, data files' directories,
    the resume checkpoint's directory, and ``others`` (the run directory)."""
    pool_cfg, data_cfg, eval_cfg = (config.get(k) or {} for k in ("pool", "data", "eval"))
    protected = dict(others)
    sources = {"the base": pool_cfg.get("base"),
               **{f"expert {n!r}": s for n, s in (pool_cfg.get("experts") or {}).items()}}
    protected.update({role: Path(s) for role, s in sources.items() if isinstance(s, (str, Path)) and is_local(s)})
    dev = (config.get("search") or {}).get("dev")
    for kind, paths in (("calibration", data_cfg.get("paths")), ("test", eval_cfg.get("tests")), ("dev", dev)):
        for task, source in (paths or {}).items():
            path = source.get("dataset") if isinstance(source, Mapping) else source
            if isinstance(path, (str, Path)) and Path(path).expanduser().exists():
                path = Path(path).expanduser()
                protected[f"the directory of task {task!r}'s {kind} data"] = path if path.is_dir() else path.parent
    if config.get("resume"):
        protected["the resume checkpoint's directory"] = Path(config["resume"]).expanduser().parent
    return protected


@dataclass
class Checked:
    """What the checks before loading produced: the objective, the calibration rows, the harness tasks and the
    search with its dev rows (``search=cma``)."""

    objective: Objective
    rows: dict[str, Sequence[Mapping]] | None
    harness: HarnessOptions | None = None
    search: SearchOptions | None = None
    dev: dict[str, Sequence[Mapping]] | None = None


def check_before_loading(config: Mapping, run_dir: Path, pool: ExpertPool | None = None) -> Checked:
    """Every check that needs no model, so that bad input costs milliseconds and writes nothing: config
    keys and numbers, expert names, the objective, ``output_dir``, the calibration data and ``resume=``.
    The sources' files are checked next, by ``ExpertPool``, before the base is loaded."""
    check_known_keys(config)
    check_numbers(config)
    output_options(config)
    hub_options(config)
    pool_cfg = config.get("pool") or {}
    experts = pool.expert_names if pool is not None else check_task_names(list(pool_cfg.get("experts") or {}))
    objective: Objective = construct(OBJECTIVES, "objective", config.get("objective") or {"name": "entropy"})
    if pool_cfg.get("shard"):
        check_shard(objective, bool(config.get("recompute")), parse_offload(pool_cfg.get("offload")),
                    (config.get("trainer") or {}).get("strategy", "auto"))
    if not objective.supports_offload and parse_offload(pool_cfg.get("offload")):
        raise AdamergeError(f"objective={config['objective']['name']} rewrites the task vectors themselves, next to "
                            "the coefficients; it does not take pool.offload=cpu")
    if config.get("output_dir") is not None:
        protected = protected_inputs(config, {"the run directory": run_dir})
        check_output_dir(config["output_dir"], bool(config.get("overwrite")), protected)
    causal = is_causal(pool) if pool is not None else "CausalLM" in str(pool_cfg.get("auto_class", "CausalLM"))
    search = search_options(config)
    rows = load_calibration(config.get("data") or {}, experts, objective, causal) \
        if needs_calibration(config, objective, search) else None
    gran_cfg = config.get("granularity") or {}
    if gran_cfg.get("init") == "sens":
        require_data(rows)
    if (config.get("optim") or {}).get("name") == "frank_wolfe":
        check_frank_wolfe(gran_cfg.get("transform", "identity"), objective)
    build_mask(gran_cfg.get("mask"), gran_cfg.get("space", "task_vectors"))  # the Concrete mask's options
    check_closed_form(config, rows)
    load_test_sets(config.get("eval") or {}, causal)  # read again for the evaluation: small, and checked now
    if config.get("resume"):
        granularity = GRANULARITIES.get((config.get("granularity") or {}).get("name"))
        read_resume(config["resume"], experts, granularity.__name__ if granularity else None)
    dev = load_dev_rows(search, config, causal) if search is not None and search.fitness == "eval" else None
    return Checked(objective, rows, harness_options(config, causal), search, dev)
