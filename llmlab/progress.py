"""Whether to draw progress bars: on a terminal by default; LLMLAB_PROGRESS=1/0 forces them on/off."""

from __future__ import annotations

import os
import sys


def progress_enabled() -> bool:
    flag = os.environ.get("LLMLAB_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no", "")
    return sys.stderr.isatty()
