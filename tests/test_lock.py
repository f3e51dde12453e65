"""The locks in requirements/ agree with pyproject.toml, and every install path uses them.

A dependency added to pyproject.toml without `bash scripts/lock.sh`, or a bound the locked version no longer
meets, fails here (offline: the lock is read, nothing is resolved). The installed venv is checked against
the lock too, so a hand-installed package version shows.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s\\;]+)", re.M)
ENV = {**default_environment(), "python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "extra": ""}


def pins(path: Path) -> dict[str, Version]:
    """name -> pinned version of a uv-compiled lock."""
    return {canonicalize_name(m.group(1)): Version(m.group(3)) for m in PIN.finditer(path.read_text())}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(*extras: str) -> list[Requirement]:
    proj = project()
    found = [Requirement(r) for r in proj["dependencies"]]
    for extra in extras:
        found += [Requirement(r) for r in proj["optional-dependencies"][extra]]
    return [r for r in found if r.marker is None or r.marker.evaluate(ENV)]


@pytest.mark.parametrize("lock, extras", [("dev.txt", ("s3", "dev")), ("runtime.txt", ("s3",))])
def test_every_requirement_of_pyproject_is_locked_at_a_version_it_allows(lock, extras):
    locked = pins(REQ / lock)
    for req in requirements(*extras):
        name = canonicalize_name(req.name)
        assert name in locked, f"{req} is in pyproject.toml but not in requirements/{lock}: run bash scripts/lock.sh"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={locked[name]}, which pyproject.toml's {req} excludes: "
            f"run bash scripts/lock.sh")


def test_runtime_lock_is_the_dev_lock_minus_the_test_tools():
    dev, runtime = pins(REQ / "dev.txt"), pins(REQ / "runtime.txt")
    assert set(runtime) < set(dev)
    differ = {name: (runtime[name], dev[name]) for name in runtime if runtime[name] != dev[name]}
    assert not differ, f"the image and CI would run different versions: {differ}"
    tools = {"pytest", "hypothesis", "moto", "sam2", "datumaro", "ultralytics"}
    assert not tools & set(runtime), "test tools leaked into the runtime lock"


def test_torch_is_the_pinned_pair_everywhere():
    pair = pins(REQ / "torch.txt")
    assert set(pair) == {"torch", "torchvision"}
    for lock in ("dev.txt", "runtime.txt"):
        locked = pins(REQ / lock)
        assert {name: locked[name] for name in pair} == pair, f"requirements/{lock} moved the torch pair"


def test_every_locked_line_carries_hashes():
    for lock in ("dev.txt", "runtime.txt", "uv.txt", "label-studio.txt"):
        text = (REQ / lock).read_text()
        for block in re.split(r"\n(?=[A-Za-z0-9])", text):
            if PIN.match(block):
                assert "--hash=sha256:" in block, f"requirements/{lock}: {block.splitlines()[0]} has no hash"


def test_installs_use_the_lock_and_never_resolve():
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert re.search(r"pip sync .*--require-hashes", setup) and "requirements/dev.txt" in setup
    assert "pip install -q --python \"$VENV/bin/python\" --no-deps -e ." in setup
    assert "-r requirements/uv.txt" in setup and "--require-hashes" in setup
    assert "bash scripts/test.sh" in (ROOT / ".ci/run").read_text()
    assert "scripts/setup.sh" in (ROOT / "scripts/test.sh").read_text()
    assert "scripts/setup.sh demo" in (ROOT / "scripts/demo.sh").read_text()


def test_the_venv_runs_the_locked_versions():
    locked = pins(REQ / "dev.txt")
    wrong = {}
    for name, version in locked.items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong[name] = (version, None)
            continue
        if installed.public != version.public and installed.base_version != version.base_version:
            wrong[name] = (version, installed)
    assert not wrong, f"the venv differs from requirements/dev.txt (run bash scripts/setup.sh): {wrong}"
