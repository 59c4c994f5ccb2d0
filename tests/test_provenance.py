"""summary.json's git_commit is this project's own commit, or null: never another repository's."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from cifarray.provenance import PROJECT_ROOT, git_commit

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=GIT_ENV).stdout.strip()


def commit_seen_from(root: Path) -> str:
    """git_commit() as a process importing the package copy under `root` reports it."""
    code = "from cifarray.provenance import git_commit; print(git_commit())"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    return out.stdout.strip()


def copy_package(root: Path) -> None:
    shutil.copytree(PROJECT_ROOT / "cifarray", root / "cifarray", ignore=shutil.ignore_patterns("__pycache__"))


def test_this_checkout_reports_its_own_head():
    if (PROJECT_ROOT / ".git").exists():
        assert git_commit() == git(PROJECT_ROOT, "rev-parse", "HEAD")
    else:  # an unpacked archive: nothing to report
        assert git_commit() is None


def test_a_copy_inside_another_repository_reports_null_and_its_own_repository_its_head(tmp_path):
    outer = tmp_path / "outer"
    (outer / "vendor" / "proj").mkdir(parents=True)
    git(outer, "init", "-q")
    (outer / "README").write_text("another project\n")
    git(outer, "add", "README")
    git(outer, "commit", "-qm", "outer")
    copy_package(outer / "vendor" / "proj")
    assert commit_seen_from(outer / "vendor" / "proj") == "None"  # not the outer repository's HEAD
    inner = outer / "vendor" / "proj"
    git(inner, "init", "-q")
    git(inner, "add", ".")
    git(inner, "commit", "-qm", "inner")
    assert commit_seen_from(inner) == git(inner, "rev-parse", "HEAD")
