"""lm-evaluation-harness scores of the models a run holds in memory (``eval.harness``; ``pip install adamerge[eval]``).

LLM users judge a merge with the harness they already run by hand on every checkpoint. A run scores the
base, optionally each expert, and the merged model before and after training on ``eval.harness.tasks``
through lm-eval's ``HFLM`` wrapped around the in-memory model (nothing is written and read back), so the
numbers are the ones ``lm_eval --model hf --model_args pretrained=OUTPUT_DIR`` gives on the folded
checkpoint. They land in ``metrics.json`` as ``metrics["harness"][model][task][metric]`` (``model``: ``base``,
``expert:NAME``, ``before``, ``after``), in the loggers, the model card (a table and ``model-index`` entries)
and the sweep summary.

``lm_eval`` is imported only when tasks are asked for: adamerge runs without the extra, and asking for tasks
without it is one line before any model is loaded. Task names are checked then too, against the local task
directory (``include_path``) first: lm-eval's own index of thousands of built-in tasks takes tens of seconds
to build, so it is read only for names the local directory does not define.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from adamerge.errors import AdamergeError

log = logging.getLogger(__name__)

INSTALL = "pip install 'adamerge[eval]'"
STDERR = "_stderr"  # lm-eval's suffix of a metric's standard error
HARNESS_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
MODEL_ROWS = {"before": "merged, before training", "after": "merged (this model)"}  # the card's row names
Scores = dict[str, dict[str, float]]  # task -> metric -> value


@dataclass
class HarnessOptions:
    """``eval.harness``: lm-eval tasks (names or glob patterns) and how to run them."""

    tasks: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 8
    include_path: str | None = None
    experts: bool = False
    manager: Any = None  # lm-eval's TaskManager, built once the names are checked

    def evaluate(self, model, tokenizer) -> Scores:
        """Every task's metrics (and their standard errors) on ``model``, an in-memory ``transformers`` model."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=self.batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(self.tasks), num_fewshot=self.num_fewshot,
                                          limit=self.limit, task_manager=self.manager, log_samples=False)
        return task_scores(results)


def harness_options(config: Mapping[str, Any], causal: bool) -> HarnessOptions | None:
    """``eval.harness`` checked (keys, numbers, the extra, the task names); None when no tasks are asked for."""
    cfg = dict((config.get("eval") or {}).get("harness") or {})
    try:
        options = HarnessOptions(**cfg)
    except TypeError as e:
        raise AdamergeError(f"eval.harness: {e}") from e
    if not options.tasks:
        return None
    if isinstance(options.tasks, str) or not all(isinstance(t, str) for t in options.tasks):
        raise AdamergeError(f"eval.harness.tasks={options.tasks!r} must be a list of lm-eval task names")
    check_numbers(options)
    if not causal:
        raise AdamergeError("eval.harness scores causal language models (pool.auto_class=AutoModelForCausalLM)")
    if find_spec("lm_eval") is None:
        raise AdamergeError(f"eval.harness.tasks needs lm-evaluation-harness: {INSTALL}")
    options.manager = task_manager(options.tasks, options.include_path)
    return options


def check_numbers(options: HarnessOptions) -> None:
    from adamerge.validate import integer

    integer(options.num_fewshot, "eval.harness.num_fewshot", 0, allow_none=True)
    integer(options.limit, "eval.harness.limit", 1, allow_none=True)
    integer(options.batch_size, "eval.harness.batch_size", 1)
    if not isinstance(options.experts, bool):
        raise AdamergeError(f"eval.harness.experts={options.experts!r} must be true or false")
    if options.include_path is not None and not Path(options.include_path).expanduser().exists():
        raise AdamergeError(f"eval.harness.include_path={options.include_path!r} does not exist")


def task_manager(tasks: Sequence[str], include_path: str | None):
    """lm-eval's ``TaskManager`` over the local tasks alone when they define every name, else with the built-in
    ones too; a name that neither defines is refused (one line)."""
    from lm_eval.tasks import TaskManager

    local = str(Path(include_path).expanduser()) if include_path else None
    if local is not None:
        manager = TaskManager(include_path=local, include_defaults=False)
        if not unknown_tasks(tasks, manager.all_tasks):
            return manager
    manager = TaskManager(include_path=local)
    unknown = unknown_tasks(tasks, manager.all_tasks)
    if unknown:
        where = f"eval.harness.include_path={include_path!r} nor " if include_path else ""
        raise AdamergeError(f"eval.harness.tasks: {unknown[0]!r} is no task of {where}lm-eval "
                            "(lm-eval --tasks list shows them)")
    return manager


def unknown_tasks(tasks: Sequence[str], known: Sequence[str]) -> list[str]:
    return [t for t in tasks if not fnmatch.filter(known, t) and not Path(t).is_file()]


def task_scores(results: Mapping[str, Any]) -> Scores:
    """lm-eval's ``results`` (and ``groups``) as task -> metric -> float. Its keys are ``metric,filter``: the
    default filter ``none`` is dropped, another is kept as ``metric/filter``; non-numbers (``N/A``) are left out."""
    scores: Scores = {}
    for task, row in {**results.get("results", {}), **results.get("groups", {})}.items():
        values = {}
        for key, value in row.items():
            metric, _, filtered = key.partition(",")
            if not filtered or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            values[metric if filtered == "none" else f"{metric}/{filtered}"] = float(value)
        if values:
            scores[task] = values
    return scores


def reference_scores(options: HarnessOptions, base, experts: Mapping[str, Any], tokenizer) -> dict[str, Scores]:
    """The base's scores and, with ``eval.harness.experts=true``, each expert's (``experts``: name -> a function
    that builds the expert in memory, dropped after its evaluation)."""
    log.info("lm-eval harness: scoring the base on %s", ", ".join(options.tasks))
    scores = {"base": options.evaluate(base, tokenizer)}
    if options.experts:
        for name, build in experts.items():
            log.info("lm-eval harness: scoring expert %r", name)
            scores[f"expert:{name}"] = options.evaluate(build(), tokenizer)
    return scores


def flat_scores(harness: Mapping[str, Scores]) -> dict[str, float]:
    """``{model: {task: {metric: v}}}`` -> ``{"model/task/metric": v}`` (logger keys)."""
    return {f"{model}/{task}/{metric}": value for model, tasks in harness.items()
            for task, metrics in tasks.items() for metric, value in metrics.items()}


def summary_columns(scores: Scores) -> dict[str, float]:
    """The sweep summary's columns of the merged model's scores (``harness/TASK/METRIC``, standard errors left out)."""
    return {f"harness/{task}/{metric}": round(value, 4) for task, metrics in scores.items()
            for metric, value in metrics.items() if not is_stderr(metric)}


def harness_section(harness: Mapping[str, Scores], options: Mapping[str, Any]) -> list[str]:
    """Markdown: a row per model (base, experts, merged before and after training), a column per task and metric,
    each score with its standard error where lm-eval gives one."""
    columns = sorted({(task, metric) for tasks in harness.values() for task, metrics in tasks.items()
                      for metric in metrics if not is_stderr(metric)})
    lines = [f"Scored with [lm-evaluation-harness]({HARNESS_URL}) on the models in memory{setting_note(options)}.",
             "", "| model | " + " | ".join(f"{t} {m}" for t, m in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, tasks in harness.items():
        cells = [cell(tasks.get(t, {}), m) for t, m in columns]
        lines.append(f"| {MODEL_ROWS.get(model, model.replace(':', ' '))} | " + " | ".join(cells) + " |")
    return lines


def setting_note(options: Mapping[str, Any]) -> str:
    notes = [f"{options['num_fewshot']}-shot" if options.get("num_fewshot") is not None else "",
             f"the first {options['limit']} documents of each task" if options.get("limit") else ""]
    notes = [n for n in notes if n]
    return f" ({', '.join(notes)})" if notes else ""


def is_stderr(metric: str) -> bool:
    return metric.partition("/")[0].endswith(STDERR)


def stderr_of(metric: str) -> str:
    """``acc`` -> ``acc_stderr``; ``exact_match/strict-match`` -> ``exact_match_stderr/strict-match``."""
    name, slash, filtered = metric.partition("/")
    return f"{name}{STDERR}{slash}{filtered}"


def cell(metrics: Mapping[str, float], metric: str) -> str:
    if metric not in metrics:
        return ""
    error = metrics.get(stderr_of(metric))
    return number(metrics[metric]) + (f" ± {number(error)}" if error is not None else "")


def number(value: float) -> str:
    """Four decimals, as the card's other metrics; significant digits for huge ones (word perplexities)."""
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"


def model_index(name: str, scores: Scores, options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Hub's ``model-index`` front matter for the merged model's scores: one result per task, its metrics
    (standard errors left out), the harness as their source."""
    results = []
    for task, metrics in scores.items():
        dataset: dict[str, Any] = {"name": task, "type": task}
        if options.get("num_fewshot") is not None:
            dataset["args"] = {"num_few_shot": options["num_fewshot"]}
        results.append({
            "task": {"type": "text-generation", "name": "Text Generation"}, "dataset": dataset,
            "metrics": [{"type": m, "value": round(v, 4), "name": m} for m, v in metrics.items()
                        if not is_stderr(m)],
            "source": {"name": "lm-evaluation-harness (adamerge)", "url": HARNESS_URL},
        })
    return [{"name": name, "results": results}] if results else []
