"""Atomic writes: a killed process leaves the old file (or directory) or the new one, never half
of one."""
from __future__ import annotations

import os
import shutil
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Calls ``write(tmp_path)`` (which may create a file or a directory), then renames it over
    ``path``. The temporary name is unique to the process, so two writers never share it; renaming
    a directory onto an existing one fails with OSError (the other writer won)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write)
