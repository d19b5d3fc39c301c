"""Run every benchmark configuration in its own fresh process and write BENCHMARKS.md.

    bash benchmarks/run_all.sh            # creates the two comparison venvs if missing, then this
    .venv/bin/python benchmarks/run_all.py [--only step|fold] [--steps 6]

Peak memory is ``ru_maxrss`` of each child, read with ``os.wait4`` (so it covers imports, building
the experts and the steps). Before each measurement the driver waits (bounded) for the machine to
be quiet and records how many cores other processes used while it ran (``bg cores``): on a
shared 2-core machine a busy neighbour stretches every OpenMP barrier, so rows measured under
load are flagged in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAIN_PY = ROOT / ".venv" / "bin" / "python"
FB_PY = HERE / ".venv-fusionbench" / "bin" / "python"
MERGEKIT = HERE / ".venv-mergekit" / "bin" / "mergekit-yaml"
RESULTS = HERE / "results.json"
REPORT = ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- results:begin (written by benchmarks/run_all.py) -->", "<!-- results:end -->"
KS = (2, 4, 8)
ROWS = ("floor", "adamerge", "adamerge-bf16", "fusionbench")
FOLD_KS = (2, 4)
FOLD_REPS = 3
ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
QUIET_CORES = 0.3  # other processes' CPU use below which the machine counts as quiet (before a run)
QUIET = 0.15  # ... during one step (as step_bench.QUIET)


# ---- processes ------------------------------------------------------------------------------------------------------


def cpu_busy() -> tuple[float, float]:
    """(busy jiffies of all CPUs, seconds since boot-ish clock) from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.monotonic()


def wait_quiet(max_wait: float, log) -> float:
    """Wait until other processes use < QUIET_CORES for 3 s (at most max_wait s); return their use."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = cpu_busy()
        time.sleep(3)
        b1, t1 = cpu_busy()
        load = (b1 - b0) / (t1 - t0)
        if load < QUIET_CORES or time.monotonic() > deadline:
            return load
        log(f"  machine busy ({load:.2f} cores used by others), waiting")
        time.sleep(10)


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> dict:
    """Run a fresh process; return its stdout, wall time, ru_maxrss and the cores others used meanwhile."""
    full_env = {**os.environ, **ENV, **(env or {})}
    b0, _ = cpu_busy()
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=full_env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        b1, _ = cpu_busy()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {code}:\n{stderr[-3000:]}")
    own = usage.ru_utime + usage.ru_stime
    return {"stdout": stdout, "wall_s": wall, "maxrss_mb": usage.ru_maxrss * 1024 / 1e6, "cpu_s": own,
            "bg_cores": max(0.0, (b1 - b0 - own) / wall)}


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


# ---- the step benchmark ---------------------------------------------------------------------------------------------


def step_cmd(row: str, k: int, mode: str, steps: int) -> list[str]:
    py = FB_PY if row == "fusionbench" else MAIN_PY
    cmd = [str(py), str(HERE / "step_bench.py"), "--row", row.removesuffix("-bf16"), "--experts", str(k),
           "--mode", mode, "--steps", str(steps), "--max-steps", str(steps)]
    return cmd + (["--tv-dtype", "bf16"] if row.endswith("-bf16") else [])


def run_step(steps: int, max_wait: float, log) -> dict:
    results: dict = {"step": [], "breakdown": []}
    for k in KS:  # interleaved, so that a noisy minute hits every row alike
        for row in ROWS:
            bg_before = wait_quiet(max_wait, log)
            m = run_measured(step_cmd(row, k, "step", 4))  # the peak is reached in the first steps
            r = {**last_json(m["stdout"]), "peak_rss_mb": m["maxrss_mb"], "wall_s": m["wall_s"],
                 "bg_cores": m["bg_cores"], "bg_cores_before": bg_before, "row": row}
            results["step"].append(r)
            log(f"  {row:14s} K={k}: peak {r['peak_rss_mb']:.0f} MB; alone {r['step_s']:.3f} s/step, "
                f"{r['cpu_s']:.3f} CPU-s/step, others used {statistics.median(r['step_bg_cores']):.2f} cores "
                f"({m['wall_s']:.0f} s)")
    results["paired"] = {}
    for k in KS:  # timing: all rows in one process, round-robin
        wait_quiet(max_wait, log)
        cmd = [str(FB_PY), str(HERE / "step_bench.py"), "--mode", "paired", "--experts", str(k), "--rounds", str(steps),
               "--parts-rounds", "3" if k == max(KS) else "0"]
        p = last_json(run_measured(cmd)["stdout"])
        results["paired"][str(k)] = p
        log(f"  paired K={k}: " + ", ".join(f"{row} {v['step_s']:.3f} s ({v['cpu_s']:.3f} CPU-s)"
                                         for row, v in p["rows"].items()))
    for row in ROWS:  # where the time and memory go (largest K); glibc told to mmap (and give back) big blocks
        wait_quiet(max_wait, log)
        m = run_measured(step_cmd(row, max(KS), "breakdown", 3), env={"MALLOC_MMAP_THRESHOLD_": "131072"})
        r = {**last_json(m["stdout"]), "bg_cores": m["bg_cores"], "row": row}
        results["breakdown"].append(r)
        log(f"  breakdown {row:14s} (CPU-s): " + ", ".join(f"{k} {v:.3f}" for k, v in r["parts_cpu_s"].items()))
    return results


# ---- peak memory with glibc giving freed memory back -----------------------------------------------------------------


PINNED_ROWS = ("adamerge", "adamerge-bf16", "fusionbench")


def run_pinned(max_wait: float, log) -> dict:
    """The memory runs again with glibc's mmap threshold pinned at 128 KiB: freed tensors go back to the
    OS at once, so the peak follows live tensors and shows how much of it is allocator retention."""
    runs = []
    for k in (KS[0], KS[-1]):
        for row in PINNED_ROWS:
            wait_quiet(max_wait, log)
            m = run_measured(step_cmd(row, k, "step", 4), env={"MALLOC_MMAP_THRESHOLD_": "131072"})
            runs.append({**last_json(m["stdout"]), "row": row, "peak_rss_mb": m["maxrss_mb"]})
            log(f"  {row:14s} K={k}, MALLOC_MMAP_THRESHOLD_=131072: peak {m['maxrss_mb']:.0f} MB")
    return {"runs": runs}


# ---- the kernels of the merge ----------------------------------------------------------------------------------------


def run_kernels(max_wait: float, log) -> dict:
    wait_quiet(max_wait, log)
    m = run_measured([str(MAIN_PY), str(HERE / "merge_kernels.py"), "--experts", str(max(KS))])
    r = {**last_json(m["stdout"]), "bg_cores": m["bg_cores"]}
    for dtype, passes in r["cpu_s"].items():
        log(f"  {dtype}: " + ", ".join(f"{k} {v:.3f}" for k, v in passes.items()))
    return r


# ---- the fold benchmark ---------------------------------------------------------------------------------------------


def run_fold(max_wait: float, log) -> dict:
    results: dict = {"runs": [], "checks": {}}
    tmp = Path(tempfile.mkdtemp(prefix="adamerge-fold-bench-"))
    try:
        for k in FOLD_KS:
            models = tmp / f"k{k}"
            m = run_measured([str(MAIN_PY), str(HERE / "fold_bench.py"), "make", str(models), "--experts", str(k)])
            results["params"] = last_json(m["stdout"])["params"]
            config = tmp / f"mergekit-k{k}.yml"
            config.write_text(subprocess.run(
                [str(MAIN_PY), str(HERE / "fold_bench.py"), "mergekit-config", str(models), "--experts", str(k)],
                capture_output=True, text=True, check=True).stdout)
            for rep in range(FOLD_REPS):
                for tool in ("mergekit", "adamerge"):
                    out = tmp / f"out-{tool}-k{k}-{rep}"
                    if tool == "adamerge":
                        cmd = [str(MAIN_PY), str(HERE / "fold_bench.py"), "adamerge", str(models), str(out),
                               "--experts", str(k)]
                    else:
                        cmd = [str(MERGEKIT), str(config), str(out), "--lazy-unpickle", "-j", "2", "--quiet",
                               "--no-copy-tokenizer"]
                    for _attempt in range(2):  # a second try if a neighbour got busy meanwhile
                        wait_quiet(max_wait, log)
                        shutil.rmtree(out, ignore_errors=True)
                        m = run_measured(cmd)
                        if m["bg_cores"] < QUIET_CORES:
                            break
                    r = {"tool": tool, "experts": k, "rep": rep, "wall_s": m["wall_s"], "cpu_s": m["cpu_s"],
                         "peak_rss_mb": m["maxrss_mb"], "bg_cores": m["bg_cores"]}
                    if tool == "adamerge":
                        r["phases_s"] = last_json(m["stdout"])["phases_s"]
                    results["runs"].append(r)
                    log(f"  fold {tool:8s} K={k} rep {rep}: {m['wall_s']:.1f} s, {m['cpu_s']:.1f} CPU-s, "
                        f"peak {m['maxrss_mb']:.0f} MB, others used {m['bg_cores']:.2f} cores")
                    if rep == FOLD_REPS - 1 and tool == "adamerge":
                        check = run_measured([str(MAIN_PY), str(HERE / "fold_bench.py"), "compare", str(out),
                                              str(tmp / f"out-mergekit-k{k}-{rep}")])
                        results["checks"][str(k)] = last_json(check["stdout"])
                    if rep < FOLD_REPS - 1:
                        shutil.rmtree(out)
            shutil.rmtree(models)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


# ---- the report -----------------------------------------------------------------------------------------------------


def slope(xs, ys) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def verdict(value: float, limit: float) -> str:
    return "**met**" if value <= limit else "**not met**"


def render(res: dict) -> str:
    out = []
    env = res["env"]
    out.append(f"{env['cpu']} ({env['cores']} cores), torch {env['torch']} (all three venvs), transformers "
               f"{env['transformers']}, fusion-bench {env['fusion_bench']}, mergekit {env['mergekit']}; "
               "OMP_WAIT_POLICY=PASSIVE. Parts: " + "; ".join(
                   f"{part} run {res[part]['meta']['date']} by `{res[part]['meta']['command']}`"
                   + (f" ({res[part]['meta']['minutes']:.0f} min)" if res[part]['meta'].get('minutes') else "")
                   for part in ("step", "pinned", "kernels", "fold")
                   if part in res and "meta" in res[part]) + ".")
    if "step" in res:
        st = res["step"]
        by = {(r["row"], r["experts"]): r for r in st["step"]}
        first = st["step"][0]
        model_mb = first["model_mb"]
        out += ["", f"### Step: {first['params'] / 1e6:.1f}M-parameter Llama ({model_mb:.0f} MB fp32), batch 4x128, "
                "layer-wise coefficients (init 0.3), entropy over all positions, Adam (lr 1e-3), 2 threads, fp32", ""]
        rounds = st["paired"][str(KS[0])]["rounds"]
        out.append(f"Step times: all four rows of one K live in ONE process and take their steps round-robin "
                   f"({rounds} rounds after 2 warm-up steps each), so that every row sees the same neighbours; "
                   "s/step and CPU-s/step (both threads) are medians over the rounds, the ratios are medians of "
                   "the within-round ratios; 'others' = cores other processes used meanwhile; faults = minor page "
                   "faults per step. Peak RSS: ru_maxrss of a FRESH process per row and K (imports, building, "
                   "4 steps).")
        out += ["", "| row | K | s/step | CPU-s/step | wall x FB | CPU x FB | wall x floor | CPU x floor | faults "
                "| others | peak RSS MB | peak x FB | VmHWM after build MB | loss at step 0 |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in KS:
            fb = by[("fusionbench", k)]
            for row in ROWS:
                r, t = by[(row, k)], st["paired"][str(k)]["rows"][row]
                out.append(
                    f"| {row} | {k} | {t['step_s']:.3f} | {t['cpu_s']:.3f} | {t['wall_x_fusionbench']:.2f} | "
                    f"{t['cpu_x_fusionbench']:.2f} | {t['wall_x_floor']:.2f} | {t['cpu_x_floor']:.2f} | "
                    f"{t['page_faults']:.0f} | {t['others_cores']:.2f} | {r['peak_rss_mb']:.0f} | "
                    f"{r['peak_rss_mb'] / fb['peak_rss_mb']:.2f} | {r['hwm_after_build_mb']:.0f} | "
                    f"{r['losses'][0]:.6f} |")
        out += ["", "Growth of peak RSS per added expert (least-squares slope over K = 2, 4, 8):", "",
                "| row | MB per expert | x model fp32 size |", "|---|---|---|"]
        growth = {}
        for row in ROWS:
            growth[row] = slope(list(KS), [by[(row, k)]["peak_rss_mb"] for k in KS])
            out.append(f"| {row} | {growth[row]:.0f} | {growth[row] / model_mb:.2f} |")
        am, am16, fb = (by[(r, max(KS))] for r in ("adamerge", "adamerge-bf16", "fusionbench"))
        t8 = st["paired"][str(max(KS))]["rows"]["adamerge"]
        targets = [
            ("step time <= 0.8 x FusionBench (wall)", t8["wall_x_fusionbench"], 0.8),
            ("step time <= 0.8 x FusionBench (CPU-s)", t8["cpu_x_fusionbench"], 0.8),
            ("step time <= 1.15 x floor (wall)", t8["wall_x_floor"], 1.15),
            ("step time <= 1.15 x floor (CPU-s)", t8["cpu_x_floor"], 1.15),
            ("peak memory <= 0.85 x FusionBench, fp32 task vectors", am["peak_rss_mb"] / fb["peak_rss_mb"], 0.85),
            ("peak memory <= 0.6 x FusionBench, bf16 task vectors", am16["peak_rss_mb"] / fb["peak_rss_mb"], 0.6),
            ("growth per expert <= 1.05 x model size (fp32)", growth["adamerge"] / model_mb, 1.05),
            ("growth per expert <= 0.55 x model size (bf16)", growth["adamerge-bf16"] / model_mb, 0.55),
        ]
        if "pinned" in res:  # the same peaks with glibc giving freed memory back at once (see below)
            pk = {(r["row"], r["experts"]): r["peak_rss_mb"] for r in res["pinned"]["runs"]}
            kmax = max(k for _, k in pk)
            targets += [
                ("peak memory <= 0.85 x FusionBench, fp32, glibc mmap threshold pinned",
                 pk[("adamerge", kmax)] / pk[("fusionbench", kmax)], 0.85),
                ("peak memory <= 0.6 x FusionBench, bf16, glibc mmap threshold pinned",
                 pk[("adamerge-bf16", kmax)] / pk[("fusionbench", kmax)], 0.6),
            ]
        if "fold" in res:
            f = res["fold"]["summary"][str(max(FOLD_KS))]
            targets.append((f"fold time <= 1.0 x mergekit (K={max(FOLD_KS)}, wall)", f["ratio"], 1.0))
            targets.append((f"fold time <= 1.0 x mergekit (K={max(FOLD_KS)}, CPU-s)", f["cpu_ratio"], 1.0))
        out += ["", f"### Targets (K={max(KS)} unless stated)", "", "| target | measured | limit | |",
                "|---|---|---|---|"]
        out += [f"| {name} | {value:.2f} | {limit} | {verdict(value, limit)} |" for name, value, limit in targets]
        order = ["merge", "forward", "model backward", "coefficient backward", "optimizer",
                 "read stacks (1st)", "read stacks (2nd)"]
        prows = st["paired"][str(max(KS))]["rows"]
        parts = sorted({p for r in prows.values() for p in r.get("parts_cpu_s", {})}, key=order.index)
        out += ["", f"### Where a K={max(KS)} step goes", "",
                "CPU-seconds per phase (median of 3 round-robin rounds in the paired process; the phases are run "
                "separately: merge with grad, forward on detached merged weights, their backward, then the "
                "backward into the coefficients). Memory columns from the breakdown process (glibc mmap threshold "
                "pinned at 128 KiB so that RSS follows live tensors): RSS between steps and the peak of a step "
                "above it.", "",
                "| row | " + " | ".join(parts) + " | sum | RSS between steps MB | step peak above it MB |",
                "|---|" + "---|" * (len(parts) + 3)]
        bd = {r["row"]: r for r in st["breakdown"]}
        for row in ROWS:
            pc = prows[row].get("parts_cpu_s", {})
            cells = [f"{pc[p]:.3f}" if p in pc else "" for p in parts]
            out.append(f"| {row} | " + " | ".join(cells) + f" | {sum(pc.values()):.3f} | "
                       f"{bd[row]['rss_steady_mb']:.0f} | {bd[row]['step_peak_above_rss_mb']:.0f} |")
        for r in st["breakdown"]:
            if r["row"] in ("adamerge", "adamerge-bf16", "fusionbench"):
                out += ["", f"Top ops of one {r['row']} step (K={max(KS)}, torch.profiler, self CPU time, "
                        "wall-clock ms of the op):", "", "| op | input shapes | calls | ms |", "|---|---|---|---|"]
                out += [f"| {op['op']} | `{op['shapes']}` | {op['calls_per_step']} | {op['self_ms_per_step']:.1f} |"
                        for op in r["top_ops"][:8]]
        if "pinned" in res:
            pin = {(r["row"], r["experts"]): r for r in res["pinned"]["runs"]}
            ks = sorted({k for _, k in pin})
            out += ["", "Peak RSS again with `MALLOC_MMAP_THRESHOLD_=131072` (glibc gives freed tensors back at once, "
                    "so the peak follows live tensors; fresh process per row and K):", "",
                    "| row | K | peak MB, default glibc | peak MB, pinned | retained by glibc MB | pinned peak x FB "
                    "| VmHWM after build MB, pinned |", "|---|---|---|---|---|---|---|"]
            for k in ks:
                for row in PINNED_ROWS:
                    r = pin[(row, k)]
                    out.append(f"| {row} | {k} | {by[(row, k)]['peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                               f"{by[(row, k)]['peak_rss_mb'] - r['peak_rss_mb']:.0f} | "
                               f"{r['peak_rss_mb'] / pin[('fusionbench', k)]['peak_rss_mb']:.2f} | "
                               f"{r['hwm_after_build_mb']:.0f} |")
            pgrowth = {row: (pin[(row, ks[-1])]["peak_rss_mb"] - pin[(row, ks[0])]["peak_rss_mb"]) / (ks[-1] - ks[0])
                       for row in PINNED_ROWS}
            out += ["", f"Growth per expert with the pinned threshold (slope between K = {ks[0]} and {ks[-1]}): "
                    + ", ".join(f"{row} {g:.0f} MB = {g / model_mb:.2f} x the model" for row, g in pgrowth.items())
                    + "."]
        b16 = next((r["bf16"] for r in st["breakdown"] if "bf16" in r), None)
        if b16:
            out += ["", f"bf16 task vectors, K={max(KS)}: the same bf16-rounded task vectors merged with bf16 maths "
                    "(what merge_tensor does) vs fp32 maths:", ""]
            out += [f"- {key}: {value:.6g}" if isinstance(value, float) else f"- {key}: {value}"
                    for key, value in b16.items()]
    if "kernels" in res:
        kn = res["kernels"]
        dtypes = list(kn["cpu_s"])
        out += ["", f"### The merge's passes over K={kn['experts']} task vectors, kernel by kernel "
                "(`benchmarks/merge_kernels.py`: CPU-seconds for every tensor of the step model once, no autograd; "
                f"others used {kn['bg_cores']:.2f} cores meanwhile)", "",
                "| pass | " + " | ".join(f"{d} stacks" for d in dtypes) + " | " +
                " | ".join(f"x read ({d})" for d in dtypes) + " |", "|---|" + "---|" * (2 * len(dtypes))]
        for key in kn["cpu_s"][dtypes[0]]:
            vals = [kn["cpu_s"][d][key] for d in dtypes]
            rel = [kn["cpu_s"][d][key] / kn["cpu_s"][d]["read once (sum)"] for d in dtypes]
            out.append(f"| {key} | " + " | ".join(f"{v:.3f}" for v in vals) + " | " +
                       " | ".join(f"{x:.2f}" for x in rel) + " |")
    if "fold" in res:
        fo = res["fold"]
        out += ["", f"### Fold: task arithmetic (lambda 0.3) of a {fo['params'] / 1e6:.0f}M-parameter Llama "
                f"({fo['params'] * 4 / 1e6:.0f} MB fp32) from safetensors directories; whole process (interpreter, "
                f"imports, load, merge, write), median of {FOLD_REPS} interleaved runs", "",
                "| K | mergekit s | adamerge s | wall ratio | mergekit CPU-s | adamerge CPU-s | CPU ratio | "
                "mergekit peak MB | adamerge peak MB | max abs diff | others | adamerge phases (s) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in FOLD_KS:
            s = fo["summary"][str(k)]
            phases = ", ".join(f"{p} {v:.1f}" for p, v in s["adamerge_phases_s"].items())
            out.append(f"| {k} | {s['mergekit_s']:.1f} | {s['adamerge_s']:.1f} | {s['ratio']:.2f} | "
                       f"{s['mergekit_cpu_s']:.1f} | {s['adamerge_cpu_s']:.1f} | {s['cpu_ratio']:.2f} | "
                       f"{s['mergekit_peak_mb']:.0f} | {s['adamerge_peak_mb']:.0f} | "
                       f"{fo['checks'][str(k)]['max_abs_diff']:.2g} | {s['bg_cores']:.2f} | {phases} |")
    return "\n".join(out)


def summarize_fold(fold: dict) -> None:
    fold["summary"] = {}
    for k in FOLD_KS:
        runs = {t: [r for r in fold["runs"] if r["tool"] == t and r["experts"] == k] for t in ("adamerge", "mergekit")}
        am, mk = (statistics.median(r["wall_s"] for r in runs[t]) for t in ("adamerge", "mergekit"))
        am_cpu, mk_cpu = (statistics.median(r["cpu_s"] for r in runs[t]) for t in ("adamerge", "mergekit"))
        names = runs["adamerge"][0]["phases_s"]
        phases = {p: statistics.median(r["phases_s"][p] for r in runs["adamerge"]) for p in names}
        fold["summary"][str(k)] = {
            "adamerge_s": am, "mergekit_s": mk, "ratio": am / mk, "adamerge_phases_s": phases,
            "adamerge_cpu_s": am_cpu, "mergekit_cpu_s": mk_cpu, "cpu_ratio": am_cpu / mk_cpu,
            "bg_cores": statistics.median(r["bg_cores"] for t in runs for r in runs[t]),
            "adamerge_peak_mb": max(r["peak_rss_mb"] for r in runs["adamerge"]),
            "mergekit_peak_mb": max(r["peak_rss_mb"] for r in runs["mergekit"]),
        }


def write_report(res: dict) -> None:
    block = f"{BEGIN}\n{render(res)}\n{END}"
    text = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    REPORT.write_text(text)


def versions() -> dict:
    def pkg(py: Path, name: str) -> str:
        r = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version('{name}'))"],
                           capture_output=True, text=True)
        return r.stdout.strip() or "missing"

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cores": os.cpu_count(),
            "torch": pkg(MAIN_PY, "torch"), "transformers": pkg(MAIN_PY, "transformers"),
            "fusion_bench": pkg(FB_PY, "fusion-bench"), "fusion_bench_torch": pkg(FB_PY, "torch"),
            "mergekit": pkg(MERGEKIT.parent / "python", "mergekit"),
            "mergekit_torch": pkg(MERGEKIT.parent / "python", "torch")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["step", "pinned", "kernels", "fold"],
                        help="run one part; the others are kept from results.json")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after 2 warm-up)")
    parser.add_argument("--max-wait", type=float, default=20, help="seconds to wait for a quiet machine, each run")
    parser.add_argument("--report-only", action="store_true", help="re-render BENCHMARKS.md from results.json")
    parser.add_argument("--smoke", action="store_true", help="K=2 only, one fold repetition, no report (a quick check)")
    args = parser.parse_args(argv)
    if args.smoke:
        global KS, FOLD_KS, FOLD_REPS, RESULTS, REPORT
        KS, FOLD_KS, FOLD_REPS = (2, 8), (2,), 1
        tmp = Path(tempfile.gettempdir())
        RESULTS, REPORT = tmp / "adamerge-bench-smoke.json", tmp / "adamerge-bench-smoke.md"

    def log(msg: str) -> None:
        print(msg, flush=True)

    for path in (MAIN_PY, FB_PY, MERGEKIT):
        if not path.exists() and not args.report_only:
            sys.exit(f"missing {path}: run `bash benchmarks/run_all.sh` (it creates the comparison venvs)")
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() and (args.only or args.report_only) else {}
    if not args.report_only:
        command = "bash benchmarks/run_all.sh" + (f" --only {args.only}" if args.only else "")
        for part, run in (("step", lambda: run_step(args.steps, args.max_wait, log)),
                          ("pinned", lambda: run_pinned(args.max_wait, log)),
                          ("kernels", lambda: run_kernels(args.max_wait, log)),
                          ("fold", lambda: run_fold(args.max_wait, log))):
            if args.only in (None, part):
                log(f"{part} benchmark")
                t0 = time.monotonic()
                res[part] = run()
                res[part]["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": command,
                                     "minutes": (time.monotonic() - t0) / 60}
        if "fold" in res:
            summarize_fold(res["fold"])
        res["env"] = versions()
        RESULTS.write_text(json.dumps(res, indent=1))
    write_report(res)
    log(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
