#!/usr/bin/env bash
# Reproduce BENCHMARKS.md: bash benchmarks/run_all.sh [--only step|fold]   (about 15 min on 2 CPU cores)
# FusionBench and mergekit live in their own venvs (never dependencies of adamerge); each gets the
# pinned CPU torch wheel first, so that no dependency pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make install  # the project venv (adamerge itself)

venv() {  # venv DIR PACKAGE==VERSION
  local dir=$1 spec=$2
  if ! "$dir/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('${spec%%==*}') != '${spec##*==}')" 2>/dev/null; then
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q torch==2.13.0
    "$dir/bin/pip" install -q "$spec"
  fi
}
venv benchmarks/.venv-fusionbench fusion-bench==0.2.33
venv benchmarks/.venv-mergekit mergekit==0.1.5

exec .venv/bin/python benchmarks/run_all.py "$@"
