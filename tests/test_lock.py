"""The lock files (``make lock``) against pyproject.toml: every runtime dependency and the msk
extra pinned, the two files agreeing on what they share, and the image's build context letting
in the one it installs. Stale after a new dependency until ``make lock`` runs: this says so."""

from __future__ import annotations

import re
import tomllib

from image_smoke import ROOT, locked_versions, normalize

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME = locked_versions(ROOT / "requirements.lock")
MSK = locked_versions(ROOT / "requirements-msk.lock")


def _names(requirements: list[str]) -> set[str]:
    return {normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r).group(0)) for r in requirements}  # type: ignore[union-attr]


def test_every_runtime_dependency_is_locked() -> None:
    missing = _names(PYPROJECT["project"]["dependencies"]) - RUNTIME.keys()
    assert not missing, f"requirements.lock lacks {sorted(missing)}: run `make lock`"


def test_the_msk_lock_is_the_runtime_lock_plus_the_msk_extra() -> None:
    missing = _names(PYPROJECT["project"]["optional-dependencies"]["msk"]) - MSK.keys()
    assert not missing, f"requirements-msk.lock lacks {sorted(missing)}: run `make lock`"
    differ = {name: (version, MSK.get(name)) for name, version in RUNTIME.items() if MSK.get(name) != version}
    assert not differ, f"the two locks disagree (runtime, msk): {differ}: run `make lock`"


def test_every_pin_has_a_hash() -> None:
    for lock in ("requirements.lock", "requirements-msk.lock"):
        lines = (ROOT / lock).read_text().splitlines()
        pins = [n for n, line in enumerate(lines) if re.match(r"[A-Za-z0-9][^ ]*==", line)]
        assert pins, f"{lock} pins nothing"
        for n in pins:
            assert lines[n].endswith("\\") and "--hash=sha256:" in lines[n + 1], f"{lock}: no hash for {lines[n]}"


def test_the_image_build_context_has_the_lock() -> None:
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!requirements-msk.lock" in allowed, \
        ".dockerignore must let in requirements-msk.lock (the image installs it)"
