"""The zoo's quality bars: is this a zoo where merging means something?

Measured once per build and stored as the zoo's report. A comparison of merge methods on the zoo
is only worth reading if every check holds: experts solve their task, the base does not, task
arithmetic (Ilharco et al. 2023, arXiv:2212.04089) at lambda = 0.3 keeps a real but incomplete
share, and better coefficients exist for a learned method (AdaMerging, arXiv:2310.02575) to find.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from adamerge.evaluate import normalized_accuracy

StateDict = dict[str, torch.Tensor]

EXPERT_MIN = 0.9
LORA_MIN = 0.8
BASE_GAP = 0.2
TA_NORMALIZED = (0.4, 0.9)
GRID_MARGIN = 0.05
TAU_RATIO_MAX = 0.05


def task_arithmetic(base: StateDict, experts: dict[str, StateDict], lambdas: dict[str, float]) -> StateDict:
    """W0 + sum_k lambda_k (W_k - W0), tensor by tensor."""
    return {name: w0 + sum(lambdas[k] * (sd[name] - w0) for k, sd in experts.items()) for name, w0 in base.items()}


def tau_ratio(base: StateDict, expert: StateDict) -> float:
    """||W_k - W0|| / ||W0|| over all tensors: how far fine-tuning moved the expert from the base."""
    moved = sum(float((expert[n].float() - w0.float()).square().sum()) for n, w0 in base.items())
    total = sum(float(w0.float().square().sum()) for w0 in base.values())
    return (moved / total) ** 0.5


def search_lambdas(
    score: Callable[[dict[str, float]], float], tasks: Sequence[str], grid: Sequence[float]
) -> tuple[dict[str, float], float]:
    """Best uniform lambda on ``grid``, then one pass of per-expert coordinate search from it.

    A cheap stand-in for what learned task-wise coefficients can reach; ``score`` is maximized.
    """
    best, best_score = {}, float("-inf")
    for lam in grid:
        candidate = dict.fromkeys(tasks, lam)
        if (s := score(candidate)) > best_score:
            best, best_score = candidate, s
    for task in tasks:
        for lam in grid:
            candidate = {**best, task: lam}
            if candidate != best and (s := score(candidate)) > best_score:
                best, best_score = candidate, s
    return best, best_score


def normalized_or_nan(scores: dict[str, float], expert_scores: dict[str, float]) -> dict[str, float]:
    """Normalized accuracy, or NaN throughout when an expert scored 0 (its quality check fails then)."""
    if all(v > 0 for v in expert_scores.values()):
        return normalized_accuracy(scores, expert_scores)
    return dict.fromkeys([*expert_scores, "avg"], float("nan"))


def quality_checks(report: dict) -> dict[str, bool]:
    """Each bar by name, True where it holds (names say the bar, so a failing one reads as a reason).

    ``report["metric"]`` names the score (``EM``, exact match, by default); LoRA experts are checked if present.
    """
    tasks = list(report["expert"])
    metric = report.get("metric", "EM")
    expert, base = report["expert"], report["base"]
    ta, grid = report["task_arithmetic"]["normalized"]["avg"], report["best_grid"]["normalized"]["avg"]
    checks = {
        f"every expert >= {EXPERT_MIN} {metric} on its task": all(expert[t] >= EXPERT_MIN for t in tasks),
        f"base >= {BASE_GAP} {metric} below each expert": all(base[t] <= expert[t] - BASE_GAP for t in tasks),
        f"task arithmetic keeps {TA_NORMALIZED[0]}-{TA_NORMALIZED[1]} normalized": (
            TA_NORMALIZED[0] <= ta <= TA_NORMALIZED[1]
        ),
        f"best grid beats task arithmetic by >= {GRID_MARGIN}": grid >= ta + GRID_MARGIN,
    }
    if "lora" in report:
        checks[f"every LoRA expert >= {LORA_MIN} {metric} on its task"] = all(
            report["lora"][t] >= LORA_MIN for t in tasks
        )
    checks[f"every ||tau||/||W0|| <= {TAU_RATIO_MAX}"] = all(r <= TAU_RATIO_MAX for r in report["tau_ratio"].values())
    return checks


def format_report(report: dict) -> str:
    """The report as a small table, one row per model, one column per task."""
    tasks = list(report["expert"])
    metric = report.get("metric", "EM")
    ta, grid = report["task_arithmetic"], report["best_grid"]
    lam = ", ".join(f"{t}={v:g}" for t, v in grid["lambdas"].items())
    rows = [
        (f"base {metric}", report["base"]),
        (f"expert {metric} (own task)", report["expert"]),
        *([(f"LoRA expert {metric} (own task)", report["lora"])] if "lora" in report else []),
        (f"task arithmetic {ta['lambda']:g} {metric}", ta["em"]),
        (f"best grid {metric}", grid["em"]),
        (f"task arithmetic {ta['lambda']:g} normalized", ta["normalized"]),
        ("best grid normalized", grid["normalized"]),
        ("||tau||/||W0||", report["tau_ratio"]),
    ]
    width = max(len(name) for name, _ in rows)
    column = max(8, *(len(t) + 1 for t in tasks))
    lines = [" " * width + "".join(f"{t:>{column}}" for t in [*tasks, "avg"])]
    for name, values in rows:
        cells = [values[t] for t in tasks]
        avg = values.get("avg", sum(cells) / len(cells))
        lines.append(f"{name:<{width}}" + "".join(f"{v:{column}.3f}" for v in [*cells, avg]))
    lines.append(f"best grid lambdas (picked on calib): {lam}")
    lines += [f"[{'ok' if held else 'FAILED'}] {bar}" for bar, held in report["checks"].items()]
    return "\n".join(lines)
