"""Whether progress can be drawn live on stderr."""
from __future__ import annotations

import os
import sys


def stderr_is_interactive() -> bool:
    """stderr is a terminal that redraws (not a log, a pipe or TERM=dumb). Not rich's is_terminal,
    which FORCE_COLOR turns on in CI logs."""
    return sys.stderr is not None and sys.stderr.isatty() and os.environ.get("TERM", "").lower() not in ("dumb", "unknown")
