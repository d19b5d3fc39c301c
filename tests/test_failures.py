"""Issue 6 through the CLI: bad input gets one clear line and writes nothing, no run loses work, no
checkpoint is half-written, nothing runs untrusted code, and a sweep survives a failing job.

Every case is ``python -m adamerge ...`` in its own process (cwd in a temporary directory,
HF_HUB_OFFLINE=1) on the tiny zoo of ``tests/tiny.py``. A process spends ~6 s of CPU importing
Lightning alone, so the ``lab`` fixture starts every case the selected tests need at once (three
processes at a time) and each test waits for its own. Faults inside the fold (a full disk, a kill
mid-write) are injected by ``faults.py``, a wrapper that patches one function and then runs
``adamerge`` exactly as ``python -m adamerge`` does.

Covered elsewhere, not repeated here: a misspelled key, an unknown granularity/objective, a missing
expert path and a non-empty output_dir (tests/test_cli.py); SIGKILL mid-training and a bitwise
resume (tests/test_training.py); ENOSPC inside ``save_folded`` in-process (tests/test_export.py);
pool validation through the Python API (tests/test_pool.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bad_input import bad_inputs
from tiny import Zoo, task_rows, write_zoo

from adamerge import AdamergeError

SLOTS = threading.BoundedSemaphore(3)  # processes at a time: 2 cores, and some cases mostly wait
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]
TIMEOUT = 300


# ---- running the CLI ---------------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PL_", "LOCAL_RANK", "RANK"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


@dataclass
class Run:
    """One finished process; its output was written to ``cwd/stdout.txt`` and ``cwd/stderr.txt``."""

    cwd: Path
    returncode: int

    @property
    def stdout(self) -> str:
        return (self.cwd / "stdout.txt").read_text()

    @property
    def stderr(self) -> str:
        return (self.cwd / "stderr.txt").read_text()

    @property
    def output(self) -> Path:  # output_dir
        return self.cwd / "out" / "merged"

    @property
    def checkpoints(self) -> Path:
        return self.cwd / "run" / "checkpoints"

    def error_line(self) -> str:
        """The one ``adamerge: error:`` line, last on stderr, and no traceback."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("adamerge: error:")]
        assert len(lines) == 1 and "Traceback" not in self.stderr, self.stderr[-3000:]
        assert self.stderr.strip().splitlines()[-1] == lines[0]
        return lines[0]


class Process:
    """``program ARG...`` in ``cwd`` (created), holding one of the SLOTS until it ends."""

    running: set[Process] = set()  # killed when the module ends, whatever happened
    lock = threading.Lock()

    def __init__(self, cwd: Path, args: list[str], program: tuple[str, ...] = ("-m", "adamerge")) -> None:
        self.cwd = cwd
        cwd.mkdir(parents=True, exist_ok=True)
        SLOTS.acquire()
        with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:  # the child keeps its own
            self.proc = subprocess.Popen([sys.executable, *program, *args], cwd=cwd, env=cli_env(), stdout=out,
                                         stderr=err)
        Process.running.add(self)

    def wait_for(self, path: Path, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{path} never appeared (exit {self.proc.returncode}):\n"
                                     f"{(self.cwd / 'stderr.txt').read_text()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self in Process.running:
            self.proc.kill()
            self.finish()

    def finish(self, timeout: float = TIMEOUT) -> Run:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            with Process.lock:
                if self in Process.running:
                    Process.running.discard(self)
                    SLOTS.release()
        return Run(self.cwd, self.proc.returncode)


def placed(cwd: Path, args: list[str], output: Path | None = None) -> list[str]:
    """ARG... with output_dir (default cwd/out/merged) and hydra.run.dir=cwd/run."""
    return [*args, f"output_dir={output or cwd / 'out' / 'merged'}", f"hydra.run.dir={cwd / 'run'}"]


def adamerge(cwd: Path, args: list[str], output: Path | None = None) -> Run:
    """``python -m adamerge ARG...`` in cwd, run to the end."""
    return Process(cwd, placed(cwd, args, output)).finish()


def zoo_args(zoo: Zoo, experts: dict[str, object] | None = None, data: dict[str, object] | None = None,
             ) -> list[str]:
    experts = zoo.experts if experts is None else experts
    data = zoo.data if data is None else data
    return [f"pool.base={zoo.base}", *(f"pool.experts.{k}={v}" for k, v in experts.items()),
            *(f"data.paths.{k}={v}" for k, v in data.items()), *QUIET]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def siblings(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name != output.name)


def loads(output: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(output)  # plain transformers: a complete checkpoint


# ---- faults.py: python -m adamerge with one function patched -------------------------------------------

FAULTS = '''
"""python faults.py MODE MARKER ARG...: ``python -m adamerge ARG...`` with a fault injected into the fold."""
import errno
import os
import runpy
import sys
import time

import adamerge.export as export
import adamerge.safetensors_io as safetensors_io

mode, marker, sys.argv = sys.argv[1], sys.argv[2], ["adamerge", *sys.argv[3:]]


def pause():
    open(marker, "w").close()
    time.sleep(600)


if mode == "enospc":  # the disk fills up 4 KiB into model.safetensors' tensors
    def write_tensor(f, tensor):
        f.write(bytes(4096))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)

    safetensors_io.write_tensor = write_tensor
elif mode == "pause-write":  # weights and tokenizer are in the temporary directory, coefficients not yet
    save_coefficients = export.save_coefficients

    def paused_save_coefficients(*args, **kwargs):
        pause()
        return save_coefficients(*args, **kwargs)

    export.save_coefficients = paused_save_coefficients
elif mode == "pause-swap":  # after the atomic exchange, before the old directory is removed
    exchange = export._exchange

    def paused_exchange(a, b):
        done = exchange(a, b)
        pause()
        return done

    export._exchange = paused_exchange
runpy.run_module("adamerge", run_name="__main__", alter_sys=True)
'''


# ---- the lab: every case the selected tests need, started together ---------------------------------------

SCENARIOS: dict[str, Callable[[Lab], object]] = {}
# chains of processes and long ones go first (the slots serve waiting scenarios in order)
LONGEST = ("code_like_data", "kill_during_fold", "sweep", "sigint", "sigterm", "straight", "disk_full")


def scenario(fn: Callable[[Lab], object]) -> Callable[[Lab], object]:
    SCENARIOS[fn.__name__] = fn
    return fn


class Lab:
    def __init__(self, root: Path, zoo: Zoo, needed: set[str]) -> None:
        self.root, self.zoo = root, zoo
        self.inputs = bad_inputs(root / "inputs", zoo.base, zoo.experts)
        (root / "faults.py").write_text(FAULTS)
        self.needed = {name for name in needed if name in SCENARIOS}
        self.pool = ThreadPoolExecutor(max_workers=max(len(SCENARIOS), 1))
        self.futures: dict[str, Future] = {}
        self.lock = threading.Lock()
        for name in sorted(self.needed, key=lambda n: (n not in LONGEST, LONGEST.index(n) if n in LONGEST else 0,
                                                       list(SCENARIOS).index(n))):
            self.start(name)

    def start(self, name: str) -> Future:
        with self.lock:
            if name not in self.futures:
                self.futures[name] = self.pool.submit(SCENARIOS[name], self)
            return self.futures[name]

    def __call__(self, name: str):
        """The result of a scenario (started now if it was not yet); its exception, if it raised."""
        return self.start(name).result(timeout=3 * TIMEOUT)

    def dir(self, name: str) -> Path:
        return self.root / name.replace(" ", "_")

    def faults(self, mode: str, cwd: Path, args: list[str], output: Path | None = None) -> Process:
        """``faults.py MODE``: marker cwd/paused."""
        return Process(cwd, [mode, str(cwd / "paused"), *placed(cwd, args, output)],
                       program=(str(self.root / "faults.py"),))


def uses(*names: str):
    def mark(fn):
        fn.scenarios = names
        return fn

    return mark


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return write_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def lab(zoo, tmp_path_factory, request):
    """Starts the scenarios of every selected test of this module (a test's ``case`` parameter, or the
    names in its ``scenarios`` attribute) in background threads."""
    needed = set()
    for item in request.session.items:
        if item.module is sys.modules[__name__]:
            callspec = getattr(item, "callspec", None)
            if callspec is not None and "case" in callspec.params:
                needed.add(callspec.params["case"])
            needed.update(getattr(item.function, "scenarios", ()))
    # children must see SIGINT's default action (a shell may start pytest with SIGINT ignored: they inherit it)
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    lab = Lab(tmp_path_factory.mktemp("failures"), zoo, needed)
    yield lab
    for process in list(Process.running):  # left over by a failed scenario
        process.kill()
    lab.pool.shutdown(wait=True, cancel_futures=True)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, previous)


# ---- 1. inputs the other failure tests need (bad input itself: tests/test_bad_input.py) ----------------------


@scenario
def pickle_allowed(lab: Lab) -> Run:
    return adamerge(lab.dir("pickle allowed"), [
        *zoo_args(lab.zoo, {"add": lab.zoo.experts["add"], "rev": lab.inputs["pickle"]}), "pool.allow_pickle=true",
        "granularity=task", "granularity.init=0.3", "trainer.max_steps=0"])


@uses("pickle_allowed")
def test_pickle_loads_when_allowed(lab, zoo):
    """pool.allow_pickle=true reads pytorch_model.bin (torch.load(weights_only=True)): task arithmetic of it."""
    run = lab("pickle_allowed")
    assert run.returncode == 0, run.stderr[-3000:]
    w0 = load_file(str(zoo.base / "model.safetensors"))
    add = load_file(str(zoo.experts["add"] / "model.safetensors"))
    rev = torch.load(lab.inputs["pickle"] / "pytorch_model.bin", weights_only=True)
    merged = load_file(str(run.output / "model.safetensors"))
    for name, w in w0.items():
        torch.testing.assert_close(merged[name], w + 0.3 * (add[name] - w) + 0.3 * (rev[name] - w), rtol=0, atol=1e-6)


@scenario
def one_expert(lab: Lab) -> Run:
    return adamerge(lab.dir("one expert"), [*zoo_args(lab.zoo, {"add": lab.zoo.experts["add"]}),
                                            "trainer.max_steps=1"])


@uses("one_expert")
def test_one_expert_is_allowed_with_a_warning(lab):
    run = lab("one_expert")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "only one expert" in run.stdout + run.stderr
    assert "only one expert" in (run.cwd / "run" / "__main__.log").read_text()
    loads(run.output)


@scenario
def tokenizer_mismatch(lab: Lab) -> Run:
    experts = {"add": lab.inputs["same_tokenizer"], "rev": lab.inputs["other_tokenizer"]}
    return adamerge(lab.dir("tokenizer mismatch"), [*zoo_args(lab.zoo, experts), "trainer.max_steps=0"])


@uses("tokenizer_mismatch")
def test_tokenizer_mismatch_is_a_warning_naming_the_expert(lab):
    """Stated behaviour: a warning (many experts ship no tokenizer), the data is tokenized with the base's."""
    run = lab("tokenizer_mismatch")
    assert run.returncode == 0, run.stderr[-3000:]
    log = (run.cwd / "run" / "__main__.log").read_text()
    warnings = [line for line in log.splitlines() if "tokenizer" in line and "WARNING" in line]
    assert len(warnings) == 1 and "expert 'rev'" in warnings[0] and "differs from the base" in warnings[0], log
    loads(run.output)


# ---- 1. a loss that becomes NaN/Inf during training ------------------------------------------------------


@scenario
def nonfinite(lab: Lab) -> Run:
    """An enormous learning rate: after one Adam step the coefficients are +-1e30 and the next backward
    overflows."""
    return adamerge(lab.dir("nonfinite"), [*zoo_args(lab.zoo), "method=adamerging_layer",
                                           "granularity.transform=identity", "trainer.accumulate_grad_batches=1",
                                           "optim.lr=1e30", "trainer.max_steps=5", "checkpoint.every_n_steps=1"])


@uses("nonfinite")
def test_nonfinite_loss_stops_and_keeps_the_last_finite_coefficients(lab):
    run = lab("nonfinite")
    assert run.returncode == 2, run.stderr[-3000:]
    line = run.error_line()
    assert "non-finite at step 1" in line or "became nan at step 1" in line, line
    assert "checkpoints/interrupted.ckpt" in line
    assert not (run.cwd / "out").exists()
    interrupted = torch.load(run.checkpoints / "interrupted.ckpt", weights_only=False)
    before = torch.load(run.checkpoints / "last.ckpt", weights_only=False)  # written after step 0
    assert interrupted["global_step"] == before["global_step"] == 1
    coefficients = interrupted["state_dict"]
    assert coefficients.keys() == before["state_dict"].keys() and coefficients
    for name, value in coefficients.items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, before["state_dict"][name]), name
    assert any((v - 0.3).abs().max() > 1 for v in coefficients.values())  # one (huge) step was taken


# ---- 1./2. the fold: a full disk, a kill mid-write, stale temporary directories -----------------------------


def with_previous_output(lab: Lab, name: str) -> tuple[Path, Path, dict[str, bytes]]:
    """A copy of an earlier run's output_dir (``code_like_data``: granularity=task, 2 steps) in lab.dir(name)."""
    earlier = lab("code_like_data")
    assert earlier.returncode == 0, earlier.stderr[-3000:]
    cwd = lab.dir(name)
    shutil.copytree(earlier.output, cwd / "out" / "merged")
    return cwd, cwd / "out" / "merged", snapshot(cwd / "out" / "merged")


def overwrite_args(lab: Lab, init: float) -> list[str]:
    return [*zoo_args(lab.zoo), "granularity=task", f"granularity.init={init}", "trainer.max_steps=0",
            "overwrite=true"]


@scenario
def disk_full(lab: Lab) -> dict:
    cwd, output, before = with_previous_output(lab, "disk full")
    run = lab.faults("enospc", cwd, overwrite_args(lab, 0.5)).finish()
    return {"run": run, "before": before, "after": snapshot(output), "siblings": siblings(output)}


@uses("disk_full")
def test_disk_full_during_the_fold_leaves_the_previous_output_untouched(lab):
    result = lab("disk_full")
    run = result["run"]
    assert run.returncode == 2, run.stderr[-3000:]
    line = run.error_line()
    assert "could not write output_dir=" in line and "No space left on device" in line
    assert result["after"] == result["before"]  # byte for byte
    assert result["siblings"] == []  # no temporary or partial directory beside it


@scenario
def kill_during_fold(lab: Lab) -> dict:
    """SIGKILL while the new fold is written, then after the swap but before the old copy is removed,
    then one normal run over the leftovers."""
    cwd, output, old = with_previous_output(lab, "kill during fold")
    states = {}
    for mode in ("pause-write", "pause-swap"):
        proc = lab.faults(mode, cwd / mode, overwrite_args(lab, 0.5), output)
        proc.wait_for(cwd / mode / "paused")
        proc.proc.send_signal(signal.SIGKILL)
        run = proc.finish()
        assert run.returncode == -signal.SIGKILL
        coefficients = load_file(str(output / "adamerge_coefficients.safetensors"))["task"]
        states[mode] = {"same as old": snapshot(output) == old, "init": coefficients.flatten().tolist(),
                        "siblings": siblings(output)}
        loads(output)  # whichever it is, it is complete
    after = adamerge(cwd / "next", overwrite_args(lab, 0.7), output)
    states["next"] = {"run": after, "siblings": siblings(output),
                      "init": load_file(str(output / "adamerge_coefficients.safetensors"))["task"].flatten().tolist()}
    return states


@uses("kill_during_fold")
def test_kill_during_the_fold_leaves_old_or_new_and_the_next_run_cleans_up(lab):
    states = lab("kill_during_fold")
    # killed while writing: the old checkpoint, byte for byte; the half-written one is a hidden sibling
    written = states["pause-write"]
    assert written["same as old"]
    assert len(written["siblings"]) == 1 and written["siblings"][0].startswith(".merged.tmp-")
    # killed right after the atomic swap: the new complete checkpoint; the old one is a hidden sibling
    # (this run removed the first one's leftover before it started: its process was gone)
    swapped = states["pause-swap"]
    assert swapped["init"] == pytest.approx([0.5, 0.5]) and not swapped["same as old"]
    assert len(swapped["siblings"]) == 1 and swapped["siblings"][0].startswith(".merged.tmp-")
    assert swapped["siblings"] != written["siblings"]
    # the next run removes the dead runs' temporaries and writes its own checkpoint
    nxt = states["next"]
    assert nxt["run"].returncode == 0, nxt["run"].stderr[-3000:]
    assert nxt["siblings"] == [] and nxt["init"] == pytest.approx([0.7, 0.7])


# ---- 2. SIGINT / SIGTERM: stop after the step, save a resumable checkpoint, exit non-zero --------------------


def long_data(lab: Lab) -> dict[str, Path]:
    """64 rows per task at batch size 1: a 64-step epoch, so a stop mid-epoch is visible."""
    paths = {}
    for task in lab.zoo.data:
        paths[task] = lab.root / "inputs" / f"long_{task}.jsonl"
        if not paths[task].exists():
            paths[task].write_text("".join(json.dumps(r) + "\n" for r in task_rows(task, 64)))
    return paths


RESUME_TO = 40  # steps of the resumed and the uninterrupted runs


def signal_args(lab: Lab) -> list[str]:
    return [*zoo_args(lab.zoo, data=long_data(lab)), "data.batch_size=1", "optim.lr=0.05",
            "checkpoint.every_n_steps=1"]


@scenario
def straight(lab: Lab) -> Run:
    """The run that SIGINT and SIGTERM interrupt, never interrupted."""
    return adamerge(lab.dir("straight"), [*signal_args(lab), f"trainer.max_steps={RESUME_TO}"])


def interrupt(lab: Lab, signum: signal.Signals) -> dict:
    """Signal the run once its first checkpoint exists, then resume from interrupted.ckpt."""
    cwd = lab.dir(f"stop {signum.name}")
    proc = Process(cwd / "stopped", placed(cwd / "stopped", [*signal_args(lab), "trainer.max_steps=100000"]))
    proc.wait_for(cwd / "stopped" / "run" / "checkpoints" / "last.ckpt")
    proc.proc.send_signal(signum)
    stopped = proc.finish(timeout=60)
    ckpt = stopped.checkpoints / "interrupted.ckpt"
    assert ckpt.is_file(), stopped.stderr[-3000:]
    step = torch.load(ckpt, weights_only=False)["global_step"]
    resumed = adamerge(cwd / "resumed", [*signal_args(lab), f"trainer.max_steps={RESUME_TO}", f"resume={ckpt}"])
    return {"stopped": stopped, "step": step, "resumed": resumed}


@scenario
def sigint(lab: Lab) -> dict:
    return interrupt(lab, signal.SIGINT)


@scenario
def sigterm(lab: Lab) -> dict:
    return interrupt(lab, signal.SIGTERM)


@uses("sigint", "sigterm", "straight")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_and_the_checkpoint_resumes(lab, signum):
    result = lab(signum.name.lower())
    stopped, step = result["stopped"], result["step"]
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    line = stopped.error_line()
    assert f"stopped by {signum.name}" in line and f"resume={stopped.checkpoints / 'interrupted.ckpt'}" in line
    if "after step" in line:  # (a SIGTERM that lands after our check is Lightning's own stop, at the same point)
        assert f"after step {step};" in line
    assert 1 <= step < RESUME_TO < 64  # within the first epoch: the step in progress ends, not the epoch
    assert not (stopped.cwd / "out").exists()
    resumed, straight = result["resumed"], lab("straight")
    for run in (resumed, straight):
        assert run.returncode == 0, run.stderr[-3000:]
    a = load_file(str(resumed.output / "adamerge_coefficients.safetensors"))
    b = load_file(str(straight.output / "adamerge_coefficients.safetensors"))
    assert a.keys() == b.keys()
    for name in a:  # stopped at step N and resumed == never stopped (CPU, same seed): bitwise
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())


# ---- 3. security: data and configs are data ---------------------------------------------------------------

CODE_LIKE_ROWS = [
    {"prompt": "${oc.env:HOME}"},
    {"prompt": "__import__('pathlib').Path('CODE_RAN').touch()", "_target_": "pathlib.Path.touch"},
    {"prompt": "{{ config.__class__ }} ${eval:'1+1'}", "_target_": "os.system", "_args_": ["touch CODE_RAN"]},
    {"prompt": "rev abc=", "answer": "${oc.env:HOME}"},
]


def write_code_like_rows(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in CODE_LIKE_ROWS))
    return path


def test_data_rows_are_read_verbatim(tmp_path):
    from adamerge.data import Collator, load_task_examples
    from adamerge.zoo.tokenizer import char_tokenizer

    rows = load_task_examples(write_code_like_rows(tmp_path / "rows.jsonl"), ["prompt"], "add")
    assert rows == CODE_LIKE_ROWS  # nothing resolved, instantiated or evaluated
    tokenizer = char_tokenizer()
    batch = Collator(tokenizer)(list(enumerate(rows)))
    expected = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    assert [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"],
                                                             strict=True)] == expected


def test_config_target_is_not_instantiated():
    """Components come from registries by name; a ``_target_`` in a config group is an unknown key."""
    from adamerge.objectives import OBJECTIVES
    from adamerge.options import construct

    with pytest.raises(AdamergeError, match="_target_"):
        construct(OBJECTIVES, "objective", {"name": "entropy", "_target_": "os.system", "_args_": ["true"]})
    with pytest.raises(AdamergeError, match="unknown"):
        construct(OBJECTIVES, "objective", {"name": "os.system"})


@scenario
def code_like_data(lab: Lab) -> Run:
    """Also the earlier run whose output_dir the fold scenarios overwrite."""
    cwd = lab.dir("code like data")
    data = {task: write_code_like_rows(cwd / "data" / f"{task}.jsonl") for task in lab.zoo.data}
    return adamerge(cwd, [*zoo_args(lab.zoo, data=data), "granularity=task", "trainer.max_steps=2"])


@uses("code_like_data")
def test_cli_trains_on_code_like_data_without_running_it(lab):
    run = lab("code_like_data")
    assert run.returncode == 0, run.stderr[-3000:]
    assert not list(run.cwd.rglob("CODE_RAN"))
    assert "trust_remote_code: `False`" in (run.output / "README.md").read_text()


def test_model_card_records_trust_remote_code(zoo, tmp_path):
    from hydra import compose, initialize_config_module

    from adamerge.overrides import open_mapping_overrides
    from adamerge.run import run

    overrides = [*zoo_args(zoo), "pool.trust_remote_code=true", "trainer.max_steps=0", f"output_dir={tmp_path / 'out'}"]
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose("config", overrides=open_mapping_overrides(overrides))
    run(cfg, tmp_path / "run")
    assert "- trust_remote_code: `True`" in (tmp_path / "out" / "README.md").read_text()


# ---- 4. under load: a sweep of 8 jobs, one of which fails -----------------------------------------------------


@scenario
def sweep(lab: Lab) -> Run:
    """4 transforms x 2 inits; sigmoid cannot start at 1.0 (its open range), the other 7 jobs train."""
    cwd = lab.dir("sweep")
    return Process(cwd, ["-m", *zoo_args(lab.zoo), "granularity.transform=identity,clamp,sigmoid,softmax",
                         "granularity.init=0.3,1.0", "trainer.max_steps=2", f"hydra.sweep.dir={cwd / 'sweep'}"]
                   ).finish()


@uses("sweep")
def test_sweep_finishes_every_job_and_marks_the_failed_one(lab):
    import csv

    run = lab("sweep")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sweep summary: 8 jobs, 1 failed" in run.stdout
    sweep_dir = run.cwd / "sweep"
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert len(rows) == 8
    (failed,) = [r for r in rows if r["status"] != "ok"]
    assert failed["status"] == "failed"
    assert "granularity.transform=sigmoid" in failed["overrides"] and "granularity.init=1.0" in failed["overrides"]
    assert "AdamergeError" in failed["error"] and "outside what transform='sigmoid' can produce" in failed["error"]
    assert "failed" in (sweep_dir / "summary.md").read_text()
    for row in rows:
        job = sweep_dir / row["job"]
        result = json.loads((job / "result.json").read_text())
        assert result["status"] == row["status"]
        if row is failed:
            assert not (job / "merged").exists()
        else:
            assert (job / "merged" / "model.safetensors").is_file() and (job / "merged" / "README.md").is_file()
