"""This machine as a device: commands through /bin/sh, files copied."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from .transport import ShellResult, Transport, run_host


class LocalTransport(Transport):
    """Runs on the host itself, with the Python that runs mixdeploy."""

    name = "local"
    tmp_root = tempfile.gettempdir()
    python = sys.executable

    def _shell(self, command: str, timeout: float) -> ShellResult:
        return run_host(["/bin/sh", "-c", command], timeout, "no /bin/sh on this machine")

    def push(self, local: Path | str, remote: str) -> None:
        shutil.copyfile(local, remote)

    def pull(self, remote: str, local: Path | str) -> None:
        shutil.copyfile(remote, local)
