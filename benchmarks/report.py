"""Tables, and the description of the machine they were measured on."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

__all__ = ["Table", "command_line", "machine", "runs_text"]


@dataclass
class Table:
    """A Markdown table with a title and notes: printed as is, and written to the docs."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(cell) for cell in cells])

    def markdown(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row)]

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths)) + " |"

        out = [
            f"**{self.title}**",
            "",
            line(self.columns),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        ]
        out += [line(row) for row in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {note}" for note in self.notes]
        return "\n".join(out)


def command_line() -> str:
    """The command that is running, as a user would type it."""
    return "python -m benchmarks.run" + "".join(" " + shlex.quote(arg) for arg in sys.argv[1:])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _os_name() -> str:
    try:
        with open("/etc/os-release") as release:
            for line in release:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"') + f", kernel {platform.release()}"
    except OSError:
        pass
    return platform.platform()


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _revision(root: Path) -> str:
    """The commit of ``root``, and whether the package differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "celery_idem")
    except (OSError, subprocess.SubprocessError):
        return "not in a git checkout"
    return f"commit {commit}" + (", with uncommitted changes in celery_idem/" if changed else "")


def machine(redis_version: str, root: Path) -> list[str]:
    """One line per fact about the machine and the software measured."""
    versions = ", ".join(f"{name} {_version(name)}" for name in ("celery", "kombu", "redis", "hiredis"))
    return [
        f"CPU: {_cpu_model()}, {os.cpu_count()} cores",
        f"OS: {_os_name()}",
        f"Python {platform.python_version()}; Redis server {redis_version}",
        versions.replace("redis ", "redis-py ", 1),
        f"celery-idem {_version('celery-idem')}, {_revision(root)}",
    ]


def runs_text(runs: int) -> str:
    """``"1 run"``, ``"5 runs"``."""
    return f"{runs} run" if runs == 1 else f"{runs} runs"
