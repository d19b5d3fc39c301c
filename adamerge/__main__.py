"""Hydra entry point: ``python -m adamerge +experiment=quickstart`` or bring-your-own models.

A single run that fails on bad input prints one line on stderr and exits with status 2. In a
multirun sweep a failed job is recorded (``result.json``) and the sweep goes on; the summary
marks it failed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from adamerge.errors import AdamergeError
from adamerge.overrides import duplicate_experts, open_mapping_overrides

log = logging.getLogger("adamerge")


def execute(cfg: DictConfig, run_dir: Path) -> dict:
    """Run a comparison table (``compare.methods``) or one merge; return the job's summary."""
    if cfg.get("compare"):
        from adamerge.compare import compare

        return {"table": compare(cfg, run_dir)}
    from adamerge.run import run

    if not cfg.get("output_dir"):
        raise AdamergeError("output_dir is not set: output_dir=DIR (where the folded checkpoint goes)")
    result = run(cfg, run_dir)
    return {"metrics": result.metrics, "fold_max_diff": result.fold_max_diff, "seconds": result.seconds,
            "output_dir": str(result.output_dir) if result.output_dir else None}


@hydra.main(version_base=None, config_path="pkg://adamerge.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from adamerge.signals import Stopped, Terminated, raise_on_sigterm
    from adamerge.terminal import quiet

    quiet(bool(cfg.get("verbose")))
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    start = time.perf_counter()
    raise_on_sigterm()  # outside training (loading, the fold) SIGTERM unwinds like Ctrl+C: temporaries are removed
    try:
        duplicate = duplicate_experts(overrides)
        if duplicate:
            raise AdamergeError(duplicate)
        summary = {"status": "ok", "overrides": overrides, **execute(cfg, run_dir)}
        summary["seconds"] = time.perf_counter() - start  # the job's wall time, loading included
    except Stopped as e:  # SIGINT/SIGTERM stopped training after a step (``training.fit``)
        print(f"adamerge: error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM outside training: nothing was half-written
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        print(f"adamerge: error: stopped by {name} before the run finished; output_dir was not written (an earlier "
              "one is unchanged)", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except Exception as raised:  # recorded for the sweep summary, then reported
        from adamerge.loggers import close_failed_run

        close_failed_run()
        e = adamerge_cause(raised)
        summary = {"status": "failed", "overrides": overrides, "error": f"{type(e).__name__}: {e}",
                   "seconds": time.perf_counter() - start}
        (run_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str))
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("job failed: %s", summary["error"])
            return
        if isinstance(e, AdamergeError):
            print(f"adamerge: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    from adamerge.ranks import is_rank_zero

    if is_rank_zero():  # DDP ranks share the run dir
        (run_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str))
        log.info("%s", where_output_went(summary, run_dir))


def where_output_went(summary: dict, run_dir: Path) -> str:
    """The run's last line: where the table or the folded checkpoint and the logs are."""
    if "table" in summary:
        return f"table: {run_dir / 'results.md'}"
    if summary.get("output_dir"):
        return f"folded checkpoint: {summary['output_dir']} (logs in {run_dir})"
    return f"no output_dir; logs and metrics in {run_dir}"


def adamerge_cause(error: BaseException) -> BaseException:
    """The AdamergeError behind ``error``, if any: OmegaConf re-raises one raised in a resolver (``${zoo:...}``
    building a zoo) as an InterpolationResolutionError, which must still read as one line."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, AdamergeError):
        cause = cause.__cause__ or cause.__context__
    return cause or error


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "fold":
        from adamerge.fold import main as fold_main

        sys.exit(fold_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "inspect":
        from adamerge.kinship import main as inspect_main

        sys.exit(inspect_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "plan":
        from adamerge.plan import main as plan_main

        sys.exit(plan_main(sys.argv[2:]))
    from adamerge.resolvers import register_resolvers

    register_resolvers()
    sys.argv = [sys.argv[0], *open_mapping_overrides(sys.argv[1:])]
    hydra_main()


if __name__ == "__main__":
    main()
