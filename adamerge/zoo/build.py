"""Build (once) and cache the offline expert zoos: the LM zoo (a tiny base, four experts, four LoRA
adapters, data; ``recipe.py``) and the text zoo (MiniLM classifiers, ``text_recipe.py``).

Everything is trained in-process from seeded synthetic data, so the embedded defaults run with no
network. A build is bit-identical from run to run on one machine, but its weights change with
torch's CPU kernel path (AVX2 vs AVX-512), and so would every table made from them: the LM zoo is
therefore built once and shipped in the repository (``data/zoo``, a few MB), and a build is only
the default where no shipped zoo is installed. The text zoo is built on demand (its table is the
same on both kernel paths).

A zoo is built into a temporary sibling directory, its marker file and a manifest of the SHA-256
of every file are written, and only then is the directory renamed into place: an interrupted build
never looks complete, and a complete one is reused by every later call once its files match the
manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adamerge.errors import AdamergeError
from adamerge.zoo.recipe import ZooSettings, train_zoo
from adamerge.zoo.tasks import EXPERT_TASKS
from adamerge.zoo.text_recipe import TextZooSettings, train_text_zoo
from adamerge.zoo.text_tasks import TEXT_TASKS

MARKER = "zoo.json"
MANIFEST = "SHA256SUMS"
"""``sha256sum`` format (``<hex>  <path>``), so ``cd data/zoo && sha256sum -c SHA256SUMS`` checks it too."""
FORMAT = 2
SHIPPED = Path(__file__).resolve().parents[2] / "data" / "zoo"
"""The LM zoo shipped with the repository: ``python -m adamerge.zoo build --out data/zoo --force`` made it."""


@dataclass(frozen=True)
class Zoo:
    """Paths of a built zoo (HF directories and jsonl files, keyed by task) and its quality report."""

    root: Path
    base: Path
    experts: dict[str, Path]
    lora: dict[str, Path]
    calib: dict[str, Path]
    test: dict[str, Path]
    report: dict

    @classmethod
    def at(cls, root: Path, report: dict, tasks: Sequence[str] = tuple(EXPERT_TASKS), lora: bool = True) -> Zoo:
        return cls(
            root=root,
            base=root / "base",
            experts={t: root / "experts" / t for t in tasks},
            lora={t: root / "lora" / t for t in tasks} if lora else {},
            calib={t: root / "data" / t / "calib.jsonl" for t in tasks},
            test={t: root / "data" / t / "test.jsonl" for t in tasks},
            report=report,
        )


def default_root() -> Path:
    """``$ADAMERGE_ZOO`` if set, else the shipped zoo, else (an install without ``data/``) a build
    cached in ``~/.cache/adamerge/zoo-v2`` (bump the version when the recipe changes)."""
    if os.environ.get("ADAMERGE_ZOO"):
        return Path(os.environ["ADAMERGE_ZOO"]).expanduser()
    return SHIPPED if (SHIPPED / MARKER).exists() else Path.home() / ".cache" / "adamerge" / "zoo-v2"


def default_text_root() -> Path:
    """``$ADAMERGE_ZOO_TEXT`` if set, else ``~/.cache/adamerge/zoo-text-v2``."""
    return Path(os.environ.get("ADAMERGE_ZOO_TEXT") or Path.home() / ".cache" / "adamerge" / "zoo-text-v2").expanduser()


def build_zoo(
    root: str | Path | None = None, force: bool = False, verbose: bool = True, settings: ZooSettings | None = None
) -> Zoo:
    """The zoo at ``root``, built first if missing (or if ``force``); a complete one is reused as is."""
    root = Path(root).expanduser() if root is not None else default_root()
    settings = settings or ZooSettings()
    report = build_cached(root, settings.as_json(), lambda tmp, say: train_zoo(tmp, settings, say), force,
                          verbose)
    return Zoo.at(root, report)


def build_text_zoo(
    root: str | Path | None = None, force: bool = False, verbose: bool = True, settings: TextZooSettings | None = None
) -> Zoo:
    """The text zoo (MiniLM classifiers, ``text_recipe.py``) at ``root``, built first if missing or ``force``."""
    root = Path(root).expanduser() if root is not None else default_text_root()
    settings = settings or TextZooSettings()
    report = build_cached(root, settings.as_json(), lambda tmp, say: train_text_zoo(tmp, settings, say), force,
                          verbose)
    return Zoo.at(root, report, tuple(TEXT_TASKS), lora=False)


def build_cached(
    root: Path, settings: dict, train: Callable[[Path, Callable[[str], None]], dict], force: bool, verbose: bool
) -> dict:
    """Run ``train(tmp_dir, say)`` into a temporary sibling of ``root`` and move it into place; returns
    its report. A complete zoo built with the same ``settings`` is reused once its files match its
    manifest; one built with other settings is refused."""
    if (root / MARKER).exists() and not force:
        return _load(root, settings)
    _check_replaceable(root)
    say = print if verbose else _quiet
    tmp = root.with_name(f".{root.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        report = train(tmp, say)
        _write_json(tmp / MARKER, {"format": FORMAT, "settings": settings, "built_with": _build_environment(),
                                   "report": report})
        write_manifest(tmp)
        _check_replaceable(root)
        shutil.rmtree(root, ignore_errors=True)
        _move_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"zoo ready at {root}")
    return report


def _check_replaceable(root: Path) -> None:
    """Only a zoo (or nothing, or an empty directory) may be replaced: never delete a user's files."""
    if root.exists() and not (root / MARKER).exists() and any(root.iterdir()):
        raise AdamergeError(f"{root} exists and is not an adamerge zoo; choose another zoo root")


def _move_into_place(tmp: Path, root: Path) -> None:
    try:
        os.replace(tmp, root)
    except OSError:
        if not (root / MARKER).exists():
            raise
        # A concurrent build finished first; same settings and seed, so its zoo serves as well.


def _quiet(message: str) -> None:
    """Stands in for ``print`` when ``verbose=False``."""


def _load(root: Path, settings: dict) -> dict:
    meta = json.loads((root / MARKER).read_text())
    if meta.get("format") != FORMAT or meta.get("settings") != settings:
        raise AdamergeError(
            f"the zoo at {root} was built with other settings or an older format; "
            "rebuild it with force=True (python -m adamerge.zoo build --force --out DIR) or choose another root"
        )
    verify_manifest(root)
    return meta["report"]


def _build_environment() -> dict:
    """What a build's bits may depend on besides its settings: torch's version, CPU kernel path and threads."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: Path) -> None:
    """``root/SHA256SUMS``: the digest of every other file under ``root``, sorted by path."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    (root / MANIFEST).write_text("".join(f"{_sha256(root / rel)}  {rel}\n" for rel in files))


def verify_manifest(root: Path) -> None:
    """Every file ``root/SHA256SUMS`` lists exists with that digest; else one line naming the first that differs."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise AdamergeError(f"the zoo at {root} has no {MANIFEST}; rebuild it (python -m adamerge.zoo build --force)")
    for line in manifest.read_text().splitlines():
        digest, _, rel = line.partition("  ")
        path = root / rel
        if not rel or not path.is_file() or _sha256(path) != digest:
            state = "is missing" if rel and not path.is_file() else "does not match its SHA-256"
            raise AdamergeError(
                f"zoo file {path} {state} in {manifest}: restore the zoo's files "
                f"or rebuild it (python -m adamerge.zoo build --force --out {root})"
            )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
