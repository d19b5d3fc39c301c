"""The wheel carries every module and the Hydra ``conf/`` tree (as ``adamerge.conf``), and an installed
wheel finds them from its own site-packages, not from the source checkout.

The checkout is copied first so that building leaves no ``build/`` or ``*.egg-info`` in the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import json, sys
    from importlib.resources import files

    import adamerge
    conf = files("adamerge.conf")
    yamls = []
    def walk(node, prefix=""):
        for child in node.iterdir():
            if child.is_dir():
                walk(child, prefix + child.name + "/")
            elif child.name.endswith(".yaml"):
                yamls.append(prefix + child.name)
    walk(conf)
    from hydra import compose, initialize_config_module
    with initialize_config_module(version_base=None, config_module="adamerge.conf"):
        cfg = compose(config_name="config")
    print(json.dumps({"adamerge": adamerge.__file__, "conf": str(conf), "yamls": sorted(yamls),
                      "keys": sorted(cfg.keys()), "prefix": sys.prefix}))
    """
)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.cfg", "setup.py"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("adamerge", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", str(tmp / "dist"), str(src))
    wheels = list((tmp / "dist").glob("adamerge-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_modules_and_conf(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "adamerge/conf/__init__.py" in names
    yamls = sorted(p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml"))
    missing = [y for y in yamls if f"adamerge/conf/{y}" not in names]
    assert not missing, f"conf files missing from the wheel: {missing}"
    modules = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "adamerge").rglob("*.py"))
    missing = [m for m in modules if m not in names]
    assert not missing, f"modules missing from the wheel (a package not listed in pyproject?): {missing}"
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)


def test_installed_wheel_finds_conf(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel))
    purelib = Path(run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # the dependencies (torch, hydra, ...) live in this interpreter's environment: put its site-packages
    # AFTER the new venv's, without running its .pth files (which would install the editable finder)
    (purelib / "zz_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    probe = json.loads(run(str(python), "-c", PROBE, cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    assert Path(probe["adamerge"]).resolve().is_relative_to(purelib.resolve()), probe
    assert Path(probe["conf"]).resolve().is_relative_to(purelib.resolve()), probe
    assert not Path(probe["conf"]).resolve().is_relative_to(REPO), probe
    yamls = sorted(p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml"))
    assert probe["yamls"] == yamls
    if (REPO / "conf" / "config.yaml").exists():
        assert probe["keys"], "composing the primary config from the installed package gave nothing"
