"""requirements-lock.txt pins every direct dependency exactly, inside pyproject.toml's tested bounds."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line)
            assert m, f"requirements-lock.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_lock_pins_every_direct_dependency_inside_its_bounds():
    pins = _lock()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency in pyproject.toml but not pinned in requirements-lock.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock pins {req.name}=={pins[name]} outside pyproject's {req}"


def test_bounds_have_a_tested_floor_and_a_cap():
    """Floor = the locked version (what CI runs); cap at or below the next major (next minor for 0.x)."""
    pins = _lock()
    for req in _declared():
        specs = {s.operator: Version(s.version) for s in req.specifier}
        assert ">=" in specs and "<" in specs, f"{req}: needs a tested floor (>=) and a cap (<)"
        pin = pins[canonicalize_name(req.name)]
        assert specs[">="] == Version(pin.public), f"{req}: floor {specs['>=']} is not the locked, tested {pin}"
        major, minor = pin.release[0], pin.release[1]
        cap = Version(f"0.{minor + 1}") if major == 0 else Version(f"{major + 1}")
        assert specs["<"] <= cap, f"{req}: cap {specs['<']} is above {cap}, the next {'0.x minor' if major == 0 else 'major'} after {pin}"
