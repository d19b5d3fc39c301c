"""A static merge, whole process, side by side: ``python -m adamerge method=task_arithmetic`` and ``mergekit-yaml``.

Both get the same seeded 127M-parameter Llama base and K experts (fp32 safetensors directories under a
temporary directory, ``fold_bench.make``; the base with the zoo's small tokenizer, which adamerge copies
into its output as a run does), task arithmetic with lambda 0.3 (adamerge's preset; mergekit
``weight: 0.3``, ``normalize: false``), and write a checkpoint. Each run is one fresh process timed from
start to exit; its peak RSS is ``ru_maxrss`` read with ``os.wait4``; the runs of both tools alternate
(``--reps`` each), each after the machine is quiet (``run_all.wait_quiet``), and the medians are compared.
It prints one markdown table (wall, CPU, peak RSS, ratios adamerge/mergekit, max abs difference of the
outputs) and, for adamerge, where its time goes: importing its CLI, and the phases its log timestamps
(``RUN_DIR/__main__.log``) mark::

    .venv/bin/python benchmarks/static_vs_mergekit.py --mergekit /work/peers/mergekit/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fold_bench import mergekit_config  # noqa: E402
from run_all import MAIN_PY, QUIET_CORES, last_json, run_measured, wait_quiet  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def adamerge_cmd(models: Path, k: int, out: Path, run_dir: Path) -> list[str]:
    experts = [f"pool.experts.e{i}={models / f'e{i}'}" for i in range(k)]
    return [str(MAIN_PY), "-m", "adamerge", "method=task_arithmetic", f"pool.base={models / 'base'}", *experts,
            f"output_dir={out}", f"hydra.run.dir={run_dir}", "logger=none", "trainer.enable_progress_bar=false"]


def mergekit_cmd(mergekit: Path, config: Path, out: Path) -> list[str]:
    return [str(mergekit), str(config), str(out), "--lazy-unpickle", "-j", "2", "--quiet", "--no-copy-tokenizer"]


def log_phases(run_dir: Path) -> list[tuple[str, float]]:
    """(message, seconds since the log's first line) of each line adamerge logged: where its time went."""
    lines = []
    for line in (run_dir / "__main__.log").read_text().splitlines():
        if not line.startswith("[") or "] - " not in line:
            continue
        lines.append((datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f"), line.split("] - ", 1)[1][:90]))
    return [(msg, (t - lines[0][0]).total_seconds()) for t, msg in lines]


def import_seconds() -> float:
    """Wall time of a process that only imports adamerge's CLI module (interpreter start included)."""
    m = run_measured([str(MAIN_PY), "-c", "import adamerge.__main__"])
    return m["wall_s"]


def compare(a: Path, b: Path) -> dict:
    """``fold_bench.py compare`` in its own process: max |difference| over the tensors both wrote."""
    done = subprocess.run([str(MAIN_PY), str(HERE / "fold_bench.py"), "compare", str(a), str(b)],
                          capture_output=True, text=True, check=True)
    return last_json(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", type=Path, default=Path("/work/peers/mergekit/bin/mergekit-yaml"))
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine per run")
    args = parser.parse_args()
    if not args.mergekit.exists():
        parser.error(f"no mergekit-yaml at {args.mergekit}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows, started = [], datetime.now()
    tmp = Path(tempfile.mkdtemp(prefix="adamerge-static-bench-"))
    try:
        models = tmp / "models"
        made = run_measured([str(MAIN_PY), str(HERE / "fold_bench.py"), "make", str(models),
                             "--experts", str(max(args.experts))])
        params = last_json(made["stdout"])["params"]
        subprocess.run([str(MAIN_PY), "-c", "import sys; from adamerge.zoo.tokenizer import char_tokenizer; "
                        "char_tokenizer().save_pretrained(sys.argv[1])", str(models / "base")], check=True)
        model_mb = params * 4 / 1e6
        log(f"made base + {max(args.experts)} experts: {params / 1e6:.1f}M parameters, {model_mb:.0f} MB each")
        imports = [import_seconds() for _ in range(2)]
        for k in args.experts:
            config = tmp / f"mergekit-k{k}.yml"
            config.write_text(mergekit_config(models, k))
            runs: dict[str, list[dict]] = {"mergekit": [], "adamerge": []}
            for rep in range(args.reps):
                for tool in ("mergekit", "adamerge"):
                    out, run_dir = tmp / f"out-{tool}-k{k}", tmp / f"run-k{k}-{rep}"
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = mergekit_cmd(args.mergekit, config, out) if tool == "mergekit" else \
                        adamerge_cmd(models, k, out, run_dir)
                    wait_quiet(args.max_wait, log)
                    m = run_measured(cmd)
                    if tool == "adamerge":
                        m["phases"] = log_phases(run_dir)
                    runs[tool].append(m)
                    log(f"K={k} {tool:8s} rep {rep}: {m['wall_s']:.1f} s, {m['cpu_s']:.1f} CPU-s, "
                        f"peak {m['maxrss_mb']:.0f} MB, others {m['bg_cores']:.2f} cores")
            check = compare(tmp / f"out-adamerge-k{k}", tmp / f"out-mergekit-k{k}")
            med = {t: {q: statistics.median(r[q] for r in runs[t]) for q in ("wall_s", "cpu_s", "maxrss_mb")}
                   for t in runs}
            rows.append({"k": k, "med": med, "check": check, "others": max(r["bg_cores"] for t in runs
                                                                             for r in runs[t]),
                         "phases": runs["adamerge"][-1]["phases"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"Run {started:%Y-%m-%d %H:%M}, CPU {cpu_model()} ({len(os.sched_getaffinity(0))} cores), "
          f"{params / 1e6:.1f}M parameters ({model_mb:.0f} MB fp32), medians of {args.reps} interleaved runs; "
          f"importing adamerge's CLI alone: {min(imports):.1f} s\n")
    print("| K | mergekit s | adamerge s | wall ratio | mergekit CPU-s | adamerge CPU-s | CPU ratio | "
          "mergekit peak MB | adamerge peak MB | peak ratio | max abs diff | others (cores) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mk, am = r["med"]["mergekit"], r["med"]["adamerge"]
        print(f"| {r['k']} | {mk['wall_s']:.1f} | {am['wall_s']:.1f} | {am['wall_s'] / mk['wall_s']:.2f} | "
              f"{mk['cpu_s']:.1f} | {am['cpu_s']:.1f} | {am['cpu_s'] / mk['cpu_s']:.2f} | {mk['maxrss_mb']:.0f} | "
              f"{am['maxrss_mb']:.0f} | {am['maxrss_mb'] / mk['maxrss_mb']:.2f} | "
              f"{r['check']['max_abs_diff']:.1e} | {r['others']:.2f} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        for tool in ("adamerge", "mergekit"):
            growth = (b["med"][tool]["maxrss_mb"] - a["med"][tool]["maxrss_mb"]) / (b["k"] - a["k"])
            print(f"\n{tool}: peak RSS grows {growth:.0f} MB per added expert = {growth / model_mb:.2f}x the model "
                  f"(K={a['k']} -> {b['k']})", end="")
        print()
    for r in rows:
        print(f"\nadamerge K={r['k']}, its log (seconds since its first line): " +
              "; ".join(f"{t:.1f} {msg}" for msg, t in r["phases"]))
    print(json.dumps({"quiet_cores_threshold": QUIET_CORES, "rows": rows}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
