"""requirements.lock: what `make install` installs, and checks that keep it honest.

    python tools/lock.py strip LOCK         drop torch and triton from a pip-compile output
    python tools/lock.py check [LOCK]       the lock agrees with pyproject.toml (exit 1 if not)
    python tools/lock.py system-constraints LOCK
                                            the lock less what this Python already has, plus
                                            torch==<its version>: a GPU box keeps its own stack

torch is never locked: the CPU wheel and a GPU box's CUDA build are different files, and
triton's version is tied to the torch release it came with. Standard library only, except
`check`, which reads version ranges with `packaging` (installed with the server).
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
UNLOCKED = {"torch", "triton"}  # the box's own: never pinned here
EXTRAS = ("test", "bench")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _blocks(text: str) -> list[tuple[str | None, list[str]]]:
    """pip-compile's output as (package name or None, its lines incl. `# via` comments)."""
    blocks: list[tuple[str | None, list[str]]] = []
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if m:
            blocks.append((canonical(m.group(1)), [line]))
        elif line.startswith("    ") and blocks and blocks[-1][0] is not None:
            blocks[-1][1].append(line)
        else:
            blocks.append((None, [line]))
    return blocks


def pins(text: str) -> dict[str, tuple[str, str]]:
    """{name: (version, marker)} of a lock's `name==version [; marker]` lines."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*(?:;\s*(.*))?$", line)
        if m:
            out[canonical(m.group(1))] = (m.group(2), m.group(3) or "")
    return out


def strip(path: Path) -> None:
    kept = [lines for name, lines in _blocks(path.read_text()) if name not in UNLOCKED]
    path.write_text("\n".join(line for lines in kept for line in lines) + "\n")


def declared() -> list[str]:
    """Every requirement pyproject.toml declares: the server's and the test and bench extras'."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return list(project["dependencies"]) + [r for e in EXTRAS for r in extras.get(e, [])]


def check(lock: Path = LOCK) -> list[str]:
    """What is wrong between the lock and pyproject.toml: a declared dependency missing from
    the lock, a locked version outside its declared range, torch or triton pinned."""
    from packaging.requirements import Requirement

    locked = pins(lock.read_text())
    problems = [f"{name} is pinned in {lock.name}; it must stay the box's own"
                for name in sorted(UNLOCKED & locked.keys())]
    for text in declared():
        req = Requirement(text)
        name = canonical(req.name)
        if name in UNLOCKED:
            continue
        if name not in locked:
            problems.append(f"{text!r} is declared in pyproject.toml but not in {lock.name}")
        elif not req.specifier.contains(locked[name][0], prereleases=True):
            problems.append(f"{lock.name} pins {name}=={locked[name][0]}, outside {text!r}")
    return problems


def system_constraints(lock: Path) -> str:
    """The lock for a venv that sees the system site-packages: what the system already has
    (the box's CUDA stack) is left alone and torch is held at its version, so no pin can make
    pip replace or shadow it."""
    have = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()
            if d.metadata["Name"]}
    lines = [f"{name}=={version}" + (f"; {marker}" if marker else "")
             for name, (version, marker) in pins(lock.read_text()).items() if name not in have]
    return "\n".join([f"torch=={have['torch']}", *lines]) + "\n"


def main(argv: list[str]) -> int:
    command, *rest = argv or ["check"]
    lock = Path(rest[0]) if rest else LOCK
    if command == "strip":
        strip(lock)
    elif command == "check":
        problems = check(lock)
        for p in problems:
            print(f"lock: {p}", file=sys.stderr)
        if problems:
            print("lock: run `make lock` and the suite (README, Development)", file=sys.stderr)
            return 1
        print(f"lock: {lock.name} agrees with pyproject.toml")
    elif command == "system-constraints":
        sys.stdout.write(system_constraints(lock))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
