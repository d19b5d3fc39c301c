"""Every bad input, table-driven: one row per way of breaking an input, each run through the CLI.

For every row the harness copies a prepared tree (a tiny zoo, broken experts, an earlier adamerge
output, a training checkpoint) into a fresh directory, lets the row break one thing, hashes every
file, runs ``adamerge ...`` in-process (``adamerge.__main__.main`` with ``sys.argv``, cwd in the
tree) and asserts: the exit code; for a failure, one ``adamerge: error:`` line holding the row's
phrases, at most a few lines on stderr and no traceback, nothing in ``output_dir`` and no temporary
beside it; for every row, that every file that existed before has the same bytes after; and, unless
the row says models may load first, that no model was loaded at all (the error came before the
work it would waste). A new class of bad input is one more row.

Signals during the fold need a separate process: they are in tests/test_failures.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import task_rows, tiny_expert, tiny_llama, write_zoo

QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]
ONE_STEP = ["method=adamerging_layer", "trainer.max_steps=1", "trainer.accumulate_grad_batches=1"]
TASKS = ("add", "rev")


# ---- the prepared tree ------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this creates ``marker``: a pickle that carries code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def bad_inputs(root: Path, base_dir: Path, experts: dict[str, Path]) -> dict[str, Path]:
    """Experts, adapters and files that are wrong in one way each (``base_dir`` holds the tiny Llama)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from adamerge.zoo.tokenizer import char_tokenizer

    root.mkdir(parents=True)
    base = tiny_llama()
    paths = {name: root / name for name in ("gpt2", "three_layers", "narrow_mlp", "bf16", "not_a_model", "pickle",
                                            "evil_pickle", "remote_code", "same_tokenizer", "other_tokenizer", "nan",
                                            "inf", "truncated", "bad_header", "lora", "lora_other_base",
                                            "reordered_vocab", "rows_without_tokenizer")}
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=base.config.vocab_size, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                               eos_token_id=2)).save_pretrained(paths["gpt2"])
    for name, change in (("three_layers", {"num_hidden_layers": 3}), ("narrow_mlp", {"intermediate_size": 48})):
        config = {k: v for k, v in base.config.to_dict().items() if k != "architectures"}
        LlamaForCausalLM(LlamaConfig(**{**config, **change})).save_pretrained(paths[name])
    tiny_expert(base, 1).to(torch.bfloat16).save_pretrained(paths["bf16"])
    expert = tiny_expert(base, 1)
    paths["not_a_model"].mkdir()
    (paths["not_a_model"] / "notes.txt").write_text("an expert that was never saved")
    expert.config.save_pretrained(paths["pickle"])  # config.json + pytorch_model.bin (torch.save of a state dict)
    torch.save(expert.state_dict(), paths["pickle"] / "pytorch_model.bin")
    expert.config.save_pretrained(paths["evil_pickle"])
    torch.save({"model.embed_tokens.weight": RunsCode(root / "PICKLE_RAN")}, paths["evil_pickle"] / "pytorch_model.bin")

    # a model whose class lives in the directory (auto_map): importing it leaves a marker
    shutil.copytree(experts["rev"], paths["remote_code"])
    config = json.loads((paths["remote_code"] / "config.json").read_text())
    config.update(model_type="adamerge_custom", auto_map={"AutoConfig": "custom.CustomConfig",
                                                          "AutoModelForCausalLM": "custom.CustomLlama"})
    (paths["remote_code"] / "config.json").write_text(json.dumps(config))
    (paths["remote_code"] / "custom.py").write_text(
        f"open({str(root / 'REMOTE_CODE_RAN')!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'adamerge_custom'\n\n"
        "class CustomLlama(LlamaForCausalLM):\n    config_class = CustomConfig\n")

    # experts that ship a tokenizer: the base's, and one with an added token
    shutil.copytree(experts["add"], paths["same_tokenizer"])
    char_tokenizer().save_pretrained(paths["same_tokenizer"])
    shutil.copytree(experts["rev"], paths["other_tokenizer"])
    other = char_tokenizer()
    other.add_tokens(["<tool>"])
    other.save_pretrained(paths["other_tokenizer"])
    # the base's tokens in another order ('a' and 'b' swapped); extra embedding rows without their tokenizer
    shutil.copytree(experts["rev"], paths["reordered_vocab"])
    char_tokenizer().save_pretrained(paths["reordered_vocab"])
    tokenizer_json = json.loads((paths["reordered_vocab"] / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (paths["reordered_vocab"] / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    grown = tiny_expert(base, 1)
    grown.resize_token_embeddings(base.config.vocab_size + 2, mean_resizing=False)
    grown.save_pretrained(paths["rows_without_tokenizer"])

    # non-finite weights, a truncated file, a header whose shape disagrees with the bytes it describes
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        broken = tiny_expert(base, 1)
        with torch.no_grad():
            broken.model.layers[1].mlp.up_proj.weight[3, 5] = value
        broken.save_pretrained(paths[name])
    shutil.copytree(experts["rev"], paths["truncated"])
    weights = paths["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(experts["rev"], paths["bad_header"])
    weights = paths["bad_header"] / "model.safetensors"
    data = weights.read_bytes()
    entry = data.index(b'"model.layers.0.mlp.up_proj.weight"')
    shape = data.index(b'"shape":[64,32]', entry)  # (64, 32) -> (64, 33): same header length, wrong byte count
    weights.write_bytes(data[:shape] + b'"shape":[64,33]' + data[shape + len(b'"shape":[64,32]') :])

    # LoRA adapters: one made for this base, one that records another base model
    for name, trained_on in (("lora", str(base_dir)), ("lora_other_base", "meta-llama/Llama-2-7b-hf")):
        peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        peft_model.save_pretrained(paths[name])
        config = json.loads((paths[name] / "adapter_config.json").read_text())
        (paths[name] / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": trained_on}))
    return paths


def write_data_files(root: Path) -> dict[str, Path]:
    """Calibration files (their own directory, so that "output_dir is the data's directory" is its own case)
    and files broken in one way each."""
    root.mkdir(parents=True)
    paths = {}
    for task in TASKS:
        paths[task] = root / f"{task}.jsonl"
        paths[task].write_text("".join(json.dumps(r) + "\n" for r in task_rows(task)))
    rows = [json.dumps(r) + "\n" for r in task_rows("rev")]
    broken = {
        "empty": "",
        "blank_lines": "\n\n  \n",
        "no_field": "".join(rows[:2]) + json.dumps({"question": "rev abc="}) + "\n" + rows[3],
        "not_utf8": None,
        "int_prompt": rows[0] + json.dumps({"prompt": 123, "answer": "x"}) + "\n",
        "long_prompt": "".join(rows) + json.dumps({"prompt": "rev " + "ab" * 150 + "=", "answer": "ba"}) + "\n",
    }
    for name, text in broken.items():
        paths[name] = root / f"{name}.jsonl"
        if text is None:
            paths[name].write_bytes(rows[0].encode() + b'{"prompt": "rev \xff\xfe="}\n')
        else:
            paths[name].write_text(text)
    return paths


@dataclass
class Tree:
    """One row's fresh copy of the prepared tree: every path a row may break or point at."""

    root: Path

    @property
    def zoo(self) -> Path:
        return self.root / "zoo"

    @property
    def base(self) -> Path:
        return self.zoo / "base"

    def expert(self, name: str) -> Path:
        return self.zoo / name

    def bad(self, name: str) -> Path:
        return self.root / "bad" / name

    def data(self, name: str) -> Path:
        return self.root / "data" / f"{name}.jsonl"

    @property
    def out(self) -> Path:
        return self.root / "out" / "merged"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def previous(self) -> Path:
        """An earlier adamerge output (task arithmetic of the zoo)."""
        return self.root / "previous"

    @property
    def checkpoint(self) -> Path:
        """``last.ckpt`` of a one-step layer-wise run on the zoo."""
        return self.root / "trained" / "checkpoints" / "last.ckpt"

    def args(self, *extra: str, experts: dict[str, object] | None = None, data: dict[str, object] | None = None,
             output: object = None) -> list[str]:
        """``python -m adamerge`` arguments for a run on this tree, with ``extra`` overrides: one step of
        layer-wise AdaMerging (a fixed method, so that the rows do not depend on the default preset)."""
        experts = {t: self.expert(t) for t in TASKS} if experts is None else experts
        data = {t: self.data(t) for t in TASKS} if data is None else data
        return [f"pool.base={self.base}", *(f"pool.experts.{k}={v}" for k, v in experts.items()),
                *(f"data.paths.{k}={v}" for k, v in data.items()), *QUIET, *ONE_STEP,
                f"output_dir={self.out if output is None else output}", f"hydra.run.dir={self.run_dir}", *extra]

    def with_expert(self, path: object, *extra: str) -> list[str]:
        """The zoo with expert ``rev`` replaced by ``path``."""
        return self.args(*extra, experts={"add": self.expert("add"), "rev": path})

    def with_data(self, name: str, *extra: str) -> list[str]:
        """The zoo with task ``rev``'s calibration file replaced by ``data/NAME.jsonl``."""
        return self.args(*extra, data={"add": self.data("add"), "rev": self.data(name)})


# ---- running the CLI in-process ---------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    log: str
    models_loaded: int

    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.startswith("adamerge: error:")]
        assert len(lines) == 1 and "Traceback" not in self.stderr, self.stderr[-3000:]
        assert self.stderr.strip().splitlines()[-1] == lines[0]
        assert len(self.stderr.strip().splitlines()) <= 3, self.stderr  # the line, maybe a warning or two
        return lines[0]


def run_cli(argv: list[str], cwd: Path, monkeypatch) -> Result:
    """``adamerge ARGV...`` in this process, counting models loaded (``ExpertPool._load_model`` calls)."""
    from adamerge.__main__ import main
    from adamerge.pool import ExpertPool

    loaded = []
    load = ExpertPool._load_model

    def counting_load(self, source, role):
        loaded.append(role)
        return load(self, source, role)

    monkeypatch.setattr(ExpertPool, "_load_model", counting_load)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["adamerge", *argv])
    out, err, code = io.StringIO(), io.StringIO(), 0
    sigterm = signal.getsignal(signal.SIGTERM)  # the CLI installs its own; pytest's comes back after
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    log = "".join(p.read_text() for p in cwd.rglob("*.log"))
    return Result(code, out.getvalue(), err.getvalue(), log, len(loaded))


def signal_during_the_fold(signum: signal.Signals, monkeypatch) -> None:
    """The process receives ``signum`` while the fold's temporary directory is half written."""
    import adamerge.export

    save_coefficients = adamerge.export.save_coefficients

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return save_coefficients(*args, **kwargs)

    monkeypatch.setattr(adamerge.export, "save_coefficients", interrupted)


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


# ---- the rows --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One way of breaking the input: ``argv(tree)``, the expected exit code and phrases of the error line (or,
    for an accepted input, of a warning in the log). ``prepare(tree)`` breaks something on disk first;
    ``loads``: models may be loaded before the error (the error is about what loading reveals);
    ``check(tree, result)``: anything else to assert; ``fault``: a signal this process sends itself while
    the fold is being written (into its temporary directory, after the weights)."""

    argv: Callable[[Tree], list[str]]
    phrases: tuple[str, ...]
    code: int = 2
    prepare: Callable[[Tree], None] | None = None
    loads: bool = False
    check: Callable[[Tree, Result], None] | None = None
    fault: signal.Signals | None = None


def overwrite_into(where: Callable[[Tree], object]) -> Callable[[Tree], list[str]]:
    return lambda t: t.args("overwrite=true", output=where(t))


def user_folder(t: Tree) -> None:
    (t.root / "mine").mkdir()
    (t.root / "mine" / "thesis.tex").write_text("years of work")


def stale_lookalikes(t: Tree) -> None:
    """User folders whose names match the temporary pattern beside output_dir (kept by the run)."""
    for name in (".merged.old-2023", ".merged.tmp-99999-mine", ".merged.tmp-1-abc"):
        (t.out.parent / name).mkdir(parents=True)
        (t.out.parent / name / "keep.txt").write_text("mine")


def symlinked_output(t: Tree) -> None:
    (t.root / "real").mkdir()
    t.out.parent.mkdir(parents=True)
    t.out.symlink_to(t.root / "real")


def written_through_the_link(t: Tree, result: Result) -> None:
    assert t.out.is_symlink() and t.out.resolve() == (t.root / "real").resolve()
    assert (t.root / "real" / "model.safetensors").is_file()
    config = (t.root / "real" / "adamerge_config.yaml").read_text()
    assert "init: 0.7" in config  # the new merge, not the previous one
    assert sorted(p.name for p in t.root.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in t.out.parent.iterdir()) == ["merged"]


def untouched_lookalikes(t: Tree, result: Result) -> None:
    assert (t.out / "model.safetensors").is_file()
    for name in (".merged.old-2023", ".merged.tmp-99999-mine", ".merged.tmp-1-abc"):
        assert (t.out.parent / name / "keep.txt").read_text() == "mine"


def replace_expert_weights(t: Tree) -> None:
    """The expert behind the earlier output changed on disk since the run."""
    tiny_expert(tiny_llama(), 7).save_pretrained(t.expert("rev"))


def write_config(text: str) -> Callable[[Tree], None]:
    def prepare(t: Tree) -> None:
        (t.previous / "adamerge_config.yaml").write_text(text)

    return prepare


def text_checkpoint(t: Tree) -> None:
    t.checkpoint.write_text("not a checkpoint\n")


def code_checkpoint(t: Tree) -> None:
    torch.save({"state_dict": {}, "x": RunsCode(t.root / "PICKLE_RAN")}, t.checkpoint)


def no_interrupted_checkpoint(t: Tree, result: Result) -> None:
    assert not (t.run_dir / "checkpoints").exists(), list((t.run_dir / "checkpoints").iterdir())


def nothing_ran(t: Tree, result: Result) -> None:
    assert not list(t.root.rglob("PICKLE_RAN")) and not list(t.root.rglob("REMOTE_CODE_RAN"))


def static(*extra: str) -> tuple[str, ...]:
    return ("granularity=task", "granularity.init=0.7", "trainer.max_steps=0", *extra)


CASES: dict[str, Case] = {
    # 1. never destroy an input or an unrelated directory
    "output is the base": Case(overwrite_into(lambda t: t.base), ("is the base",)),
    "output is an expert": Case(overwrite_into(lambda t: t.expert("rev")), ("is expert 'rev'",)),
    "output is a LoRA adapter": Case(lambda t: t.with_expert(t.bad("lora"), "overwrite=true",
                                                             f"output_dir={t.bad('lora')}"), ("is expert 'rev'",)),
    "output contains the models": Case(overwrite_into(lambda t: t.zoo), ("contains the base",)),
    "output is the data's directory": Case(overwrite_into(lambda t: t.root / "data"),
                                           ("is the directory of task 'add''s calibration data",)),
    "output is the run directory": Case(overwrite_into(lambda t: t.run_dir), ("is the run directory",)),
    "output is the current directory": Case(overwrite_into(lambda t: "."), ("is the current directory",)),
    "output is the home directory": Case(overwrite_into(lambda t: t.root / "home"), ("is the home directory",)),
    "output is /": Case(overwrite_into(lambda t: "/"), ("output_dir='/' contains",)),
    "overwrite a user's folder": Case(overwrite_into(lambda t: t.root / "mine"), ("not written by adamerge",),
                                      prepare=user_folder),
    "non-empty output without overwrite": Case(lambda t: t.args(output=t.root / "mine"),
                                               ("exists and is not empty; set overwrite=true",), prepare=user_folder),
    "output is a file": Case(lambda t: t.args(output=t.data("add")), ("exists and is not a directory",)),
    "output below a file": Case(lambda t: t.args(output=t.root / "notes.txt" / "out"), ("cannot be written",),
                                prepare=lambda t: (t.root / "notes.txt").write_text("x")),
    "output not writable": Case(lambda t: t.args(output="/proc/adamerge-out"), ("cannot be written",)),
    "output_dir=null": Case(lambda t: t.args(output="null"), ("output_dir is not set",)),
    "output_dir empty": Case(lambda t: t.args(output="''"), ("output_dir is not set",)),
    "expert name climbs out": Case(lambda t: [*t.args(), f"pool.experts={{..: {t.expert('rev')}}}"],
                                   ("expert name '..' cannot be used",)),
    "expert name is a path": Case(lambda t: [*t.args(), f"pool.experts={{../../m/e1: {t.expert('rev')}}}"],
                                  ("expert name '../../m/e1' cannot be used",)),
    "expert name is absolute": Case(lambda t: [*t.args(), f"pool.experts={{/tmp/e1: {t.expert('rev')}}}"],
                                    ("expert name '/tmp/e1' cannot be used",)),
    "expert name is a dot": Case(lambda t: [*t.args(), f"pool.experts={{.: {t.expert('rev')}}}"],
                                 ("expert name '.' cannot be used",)),
    "expert name has a separator": Case(lambda t: [*t.args(), f"pool.experts={{a/b: {t.expert('rev')}}}"],
                                        ("expert name 'a/b' cannot be used",)),
    "stale-temporary look-alikes are kept": Case(lambda t: t.args(*static()), (), code=0, prepare=stale_lookalikes,
                                                 loads=True, check=untouched_lookalikes),
    "SIGINT during the fold": Case(lambda t: t.args(*static("overwrite=true")),
                                   ("stopped by SIGINT before the run finished", "earlier one is unchanged"), code=130,
                                   prepare=lambda t: shutil.copytree(t.previous, t.out), loads=True,
                                   fault=signal.SIGINT),
    "SIGTERM during the fold": Case(lambda t: t.args(*static("overwrite=true")),
                                    ("stopped by SIGTERM before the run finished",), code=143,
                                    prepare=lambda t: shutil.copytree(t.previous, t.out), loads=True,
                                    fault=signal.SIGTERM),
    "symlinked output_dir is written through": Case(lambda t: t.args(*static()), (), code=0,
                                                    loads=True, prepare=symlinked_output,
                                                    check=written_through_the_link),
    # 2. never write a broken checkpoint
    "expert with NaN": Case(lambda t: t.with_expert(t.bad("nan"), *static()),
                            ("expert 'rev'", "'model.layers.1.mlp.up_proj.weight' holds NaN/Inf"), loads=True),
    "expert with Inf": Case(lambda t: t.with_expert(t.bad("inf"), *static()),
                            ("expert 'rev'", "'model.layers.1.mlp.up_proj.weight' holds NaN/Inf"), loads=True),
    "infinite init": Case(lambda t: t.args("granularity.init=inf"), ("granularity.init=inf", "finite number")),
    "fold after an expert changed": Case(lambda t: ["fold", str(t.previous), "--output", str(t.out)],
                                         ("changed since the run", "expert 'rev' (model.safetensors)", "--force"),
                                         prepare=replace_expert_weights),
    "fold with --force after a change": Case(lambda t: ["fold", str(t.previous), "--output", str(t.out), "--force"],
                                             ("changed since the run", "--force"), code=0, loads=True,
                                             prepare=replace_expert_weights),
    "fold into its own source": Case(lambda t: ["fold", str(t.previous), "--output", str(t.previous), "--overwrite"],
                                     ("is the source output",)),
    "fold into the base": Case(lambda t: ["fold", str(t.previous), "--output", str(t.base), "--overwrite"],
                               ("is the base",)),
    "fold over a user's folder": Case(lambda t: ["fold", str(t.previous), "--output", str(t.root / "mine"),
                                                 "--overwrite"], ("not written by adamerge",), prepare=user_folder),
    "fold of an empty config": Case(lambda t: ["fold", str(t.previous), "--output", str(t.out)],
                                    ("is not an adamerge run config",), prepare=write_config("")),
    "fold of a list config": Case(lambda t: ["fold", str(t.previous), "--output", str(t.out)],
                                  ("is not an adamerge run config",), prepare=write_config("- a\n- b\n")),
    "fold of a tagged config": Case(lambda t: ["fold", str(t.previous), "--output", str(t.out)],
                                    ("is not plain YAML data",),
                                    prepare=write_config("pool: !!python/object/apply:os.system ['true']\n")),
    # 3. weights
    "truncated safetensors": Case(lambda t: t.with_expert(t.bad("truncated")),
                                  ("expert 'rev'", "model.safetensors", "damaged or truncated")),
    "header disagrees with the bytes": Case(lambda t: t.with_expert(t.bad("bad_header")),
                                            ("expert 'rev'", "damaged or truncated")),
    "LoRA adapter of another base": Case(lambda t: t.with_expert(t.bad("lora_other_base"), *static()),
                                         ("expert 'rev'", "meta-llama/Llama-2-7b-hf", "pool.base is"), code=0,
                                         loads=True),
    # 3. data
    "data not UTF-8": Case(lambda t: t.with_data("not_utf8"), ("not_utf8.jsonl", "not UTF-8")),
    "prompt is a number": Case(lambda t: t.with_data("int_prompt"),
                               ("task 'rev'", "row 2 field 'prompt' is int", "expected text")),
    "prompt longer than the model": Case(lambda t: t.with_data("long_prompt", "data.batch_size=16"),
                                         ("task 'rev'", "1 of 9 calibration rows are longer than 64 tokens",
                                          "left truncation"), code=0, loads=True),
    "data empty after blank lines": Case(lambda t: t.with_data("blank_lines"), ("task 'rev' is empty",)),
    "data.limit=0": Case(lambda t: t.args("data.limit=0"), ("data.limit=0 must be a positive integer or null",)),
    "data.limit=-1": Case(lambda t: t.args("data.limit=-1"), ("data.limit=-1 must be a positive integer",)),
    # 3. numbers
    "batch size 0": Case(lambda t: t.args("data.batch_size=0"), ("data.batch_size=0 must be a positive integer",)),
    "negative batch size": Case(lambda t: t.args("data.batch_size=-2"), ("data.batch_size=-2",)),
    "zero learning rate": Case(lambda t: t.args("optim.lr=0"), ("optim.lr=0", "finite number > 0")),
    "negative learning rate": Case(lambda t: t.args("optim.lr=-0.1"), ("optim.lr=-0.1",)),
    "NaN learning rate": Case(lambda t: t.args("optim.lr=nan"), ("optim.lr=nan",)),
    "init not a number": Case(lambda t: t.args("granularity.init=abc"), ("granularity.init='abc'", "finite number")),
    "seed not an integer": Case(lambda t: t.args("seed=abc"), ("seed='abc' must be an integer",)),
    "fractional seed": Case(lambda t: t.args("seed=1.5"), ("seed=1.5 must be an integer",)),
    "negative max_steps": Case(lambda t: t.args("trainer.max_steps=-1"), ("trainer.max_steps=-1",)),
    "checkpoint every 0 steps": Case(lambda t: t.args("checkpoint.every_n_steps=0"),
                                     ("checkpoint.every_n_steps=0 must be a positive integer",)),
    # 3. resume=
    "resume a missing file": Case(lambda t: t.args(f"resume={t.root / 'nope.ckpt'}"), ("nope.ckpt", "does not exist")),
    "resume a text file": Case(lambda t: t.args(f"resume={t.checkpoint}"), ("last.ckpt", "is not a checkpoint"),
                               prepare=text_checkpoint),
    "resume a pickle carrying code": Case(lambda t: t.args(f"resume={t.checkpoint}"),
                                          ("weights_only=True", "refuses"), prepare=code_checkpoint,
                                          check=nothing_ran),
    "resume with other experts": Case(lambda t: t.args(f"resume={t.checkpoint}", experts={
        "add": t.expert("add"), "sub": t.expert("rev")}, data={"add": t.data("add"), "sub": t.data("rev")}),
        ("saved by a run with experts ['add', 'rev']", "['add', 'sub']")),
    "resume with another granularity": Case(lambda t: t.args(f"resume={t.checkpoint}", "granularity=task"),
                                            ("saved by a run with granularity Layer; this run has Task",)),
    "resume with other coefficient shapes": Case(lambda t: t.args(f"resume={t.checkpoint}", "pool.include=[layers]"),
                                                 ("resume checkpoint does not fit this run",), loads=True,
                                                 check=no_interrupted_checkpoint),
    # from the first failure-mode tests: experts that do not fit the base, untrusted code, data, pool
    "other architecture": Case(lambda t: t.with_expert(t.bad("gpt2")), ("expert 'rev'", "'model.embed_tokens.weight'"),
                               loads=True),
    "other parameter names": Case(lambda t: t.with_expert(t.bad("three_layers")),
                                  ("expert 'rev'", "'model.layers.2.", "base does not have")),
    "other shapes": Case(lambda t: t.with_expert(t.bad("narrow_mlp")),
                         ("expert 'rev'", "'model.layers.0.mlp.down_proj.weight'", "(32, 48)", "(32, 64)")),
    "reordered vocabulary": Case(lambda t: t.with_expert(t.bad("reordered_vocab")),
                                 ("expert 'rev'", "'b' at id", "the base has 'a'", "reordered or changed")),
    "added rows without a tokenizer": Case(lambda t: t.with_expert(t.bad("rows_without_tokenizer")),
                                           ("expert 'rev'", "46 rows where the base has 44", "tokenizer files")),
    "other dtype": Case(lambda t: t.with_expert(t.bad("bf16")),
                        ("expert 'rev'", "'lm_head.weight'", "torch.bfloat16", "torch.float32")),
    "not a model": Case(lambda t: t.with_expert(t.bad("not_a_model")),
                        ("expert 'rev'", "not_a_model", "not a model directory")),
    "missing expert path": Case(lambda t: t.with_expert(t.root / "nowhere"), ("expert 'rev'", "does not exist")),
    "hub id while offline": Case(lambda t: t.with_expert("some-org/some-model"),
                                 ("expert 'rev'", "'some-org/some-model'", "HF_HUB_OFFLINE"), loads=True),
    "pickle not allowed": Case(lambda t: t.with_expert(t.bad("pickle")),
                               ("expert 'rev'", "pytorch_model.bin", "pool.allow_pickle=true")),
    "pickle that runs code": Case(lambda t: t.with_expert(t.bad("evil_pickle"), "pool.allow_pickle=true"),
                                  ("expert 'rev'", "weights_only=True", "GLOBAL"), loads=True, check=nothing_ran),
    "remote code not allowed": Case(lambda t: t.with_expert(t.bad("remote_code")),
                                    ("expert 'rev'", "needs custom code", "pool.trust_remote_code=true"), loads=True,
                                    check=nothing_ran),
    "zero experts": Case(lambda t: t.args(experts={}, data={}), ("at least one expert", "pool.experts.NAME"),
                         loads=True),
    "duplicate expert names": Case(lambda t: [*t.args(), f"pool.experts.add={t.expert('rev')}"],
                                   ("pool.experts.add is given twice",)),
    "no data for a task": Case(lambda t: t.args(data={"add": t.data("add")}), ("no calibration data", "['rev']")),
    "empty data": Case(lambda t: t.with_data("empty"), ("task 'rev' is empty",)),
    "row without the field": Case(lambda t: t.with_data("no_field"), ("task 'rev'", "row 3 has no field 'prompt'")),
    "missing data file": Case(lambda t: t.args(data={"add": t.data("add"), "rev": t.root / "nope.jsonl"}),
                              ("nope.jsonl", "does not exist")),
    "more chunks than rows": Case(lambda t: t.args("granularity=chunk", "granularity.chunks={*:1000}"),
                                  ("granularity.chunks", "1000 chunks for"), loads=True),
    "negative init": Case(lambda t: t.args("granularity.init=-0.5"), ("granularity.init=-0.5", "non-negative"),
                          loads=True),
    "nan init": Case(lambda t: t.args("granularity.init=nan"), ("granularity.init=nan",)),
    "static merge without data": Case(lambda t: t.args("method=task_arithmetic", "trainer.max_steps=0", data={}),
                                      ("fold check skipped: no calibration data",), code=0, loads=True,
                                      check=lambda t, r: (t.out / "model.safetensors").is_file()),
    "objective that rewrites task vectors, offloaded": Case(
        lambda t: t.args("method=doge", "pool.offload=cpu"), ("does not take pool.offload=cpu",)),
}


# ---- the harness -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory, monkeypatch_module) -> Path:
    """The tree every row copies: zoo, broken inputs, data files, an earlier output, a training checkpoint."""
    root = tmp_path_factory.mktemp("template")
    zoo = write_zoo(root / "zoo", TASKS)
    for task in TASKS:
        zoo.data[task].unlink()  # calibration files live in data/
    bad_inputs(root / "bad", zoo.base, zoo.experts)
    write_data_files(root / "data")
    tree = Tree(root)
    for argv in (tree.args(*static(), output=tree.previous),
                 tree.args("checkpoint.every_n_steps=1", "trainer.enable_checkpointing=true",
                           f"hydra.run.dir={root / 'trained'}", output=root / "trained" / "merged")):
        result = run_cli(argv, root, monkeypatch_module)
        assert result.code == 0, result.stderr[-3000:]
    shutil.rmtree(root / "run", ignore_errors=True)
    assert tree.checkpoint.is_file()
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def fresh_tree(template: Path, root: Path) -> Tree:
    """A copy of the template whose recorded paths (the earlier output's config) point into the copy."""
    shutil.copytree(template, root, symlinks=True)
    for name in ("adamerge_config.yaml", "README.md"):
        recorded = root / "previous" / name
        recorded.write_text(recorded.read_text().replace(str(template), str(root)))
    return Tree(root)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, template, tmp_path, monkeypatch):
    case = CASES[name]
    tree = fresh_tree(template, tmp_path / "tree")
    monkeypatch.setenv("HOME", str(tree.root / "home"))
    (tree.root / "home").mkdir()
    if case.prepare is not None:
        case.prepare(tree)
    before = digest_tree(tree.root)
    if case.fault is not None:
        signal_during_the_fold(case.fault, monkeypatch)
    result = run_cli(case.argv(tree), tree.root, monkeypatch)

    assert result.code == case.code, (result.stderr[-3000:], result.stdout[-2000:])
    if case.code != 0:
        line = result.error_line()
        for phrase in case.phrases:
            assert phrase in line, (phrase, line)
        inside = f"{tree.out.relative_to(tree.root)}/"
        written = {path for path in digest_tree(tree.root) if path.startswith(inside)}
        assert written == {path for path in before if path.startswith(inside)}  # nothing new in output_dir
        assert not list(tree.out.parent.glob(".merged.*")) if tree.out.parent.exists() else True
    else:
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        said = result.stdout + result.stderr + result.log
        for phrase in case.phrases:
            assert phrase in said, (phrase, said[-3000:])
    if not case.loads:
        assert result.models_loaded == 0, f"{result.models_loaded} model(s) loaded before the error"
    after = digest_tree(tree.root)
    changed = sorted(path for path, digest in before.items() if after.get(path) != digest)
    assert changed == [], f"inputs changed or removed: {changed}"
    if case.check is not None:
        case.check(tree, result)


# ---- beside the table: what a refold writes, and the Python API's strictness ------------------------------


def test_refold_writes_the_runs_card_plus_a_refold_line(template, tmp_path, monkeypatch):
    """``adamerge fold`` keeps what the run recorded (transform, fold check, metrics) instead of rebuilding
    a poorer card, and says that it is a refold."""
    tree = fresh_tree(template, tmp_path / "tree")
    result = run_cli(["fold", str(tree.previous), "--output", str(tree.out)], tree.root, monkeypatch)
    assert result.code == 0, result.stderr[-3000:]
    before = (tree.previous / "README.md").read_text().splitlines()
    after = (tree.out / "README.md").read_text().splitlines()
    refold_lines = [line for line in after if line not in before]
    assert len(refold_lines) == 1 and "refolded" in refold_lines[0] and str(tree.previous) in refold_lines[0]
    assert [line for line in after if line in before] == before
    assert any("fold max |diff|" in line and "None" not in line for line in after)
    assert (tree.out / "metrics.json").read_text() == (tree.previous / "metrics.json").read_text()
    for name, tensor in load_file(str(tree.previous / "model.safetensors")).items():
        assert torch.equal(load_file(str(tree.out / "model.safetensors"))[name], tensor), name


def test_python_api_refuses_a_misspelled_key_and_an_unsafe_name(template, tmp_path):
    from adamerge import AdamergeError, ExpertPool
    from adamerge.run import run

    tree = fresh_tree(template, tmp_path / "tree")
    config = {"pool": {"base": str(tree.base), "experts": {t: str(tree.expert(t)) for t in TASKS},
                       "preprocess": {"method": "ties", "densty": 0.9}},
              "granularity": {"name": "task", "init": 0.3}, "objective": {"name": "entropy"},
              "trainer": {"max_steps": 0}, "output_dir": None}
    with pytest.raises(AdamergeError, match=r"unknown key pool\.preprocess\.densty"):
        run(config, tree.run_dir)
    with pytest.raises(AdamergeError, match=r"expert name 'a\\x00b' cannot be used"):
        ExpertPool(str(tree.base), {"a\x00b": str(tree.expert("rev"))})
