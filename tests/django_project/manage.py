"""``manage.py`` of the test project."""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # The project is the package tests.django_project: import it from the repository's root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
