"""The command line's error lines: one ``error:`` line and exit code 2 for what the user got wrong,
from Hydra's override parsing (before ``run.main`` runs) to a full disk."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException


def error_line(message: str) -> int:
    """Print the one ``error:`` line of a user mistake; the exit code to return (2)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def fail(message: str) -> NoReturn:
    sys.exit(error_line(message))


def disk_full(err: BaseException) -> BaseException | None:
    """The ENOSPC error behind ``err``, if any. Libraries wrap I/O errors in their own, some only
    in text (safetensors: "I/O error: No space left on device (os error 28)")."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def check_overrides(conf_dir: Path, overrides: list[str]) -> None:
    """Hydra reports a bad override (a typo'd key, an unknown group option) in several lines and
    exits 1 before ``main`` runs; compose first, so it is one ``error:`` line and exit 2 as well."""
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if any(line.startswith("Available options") for line in lines):  # an unknown group option
            start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
            options = [o for o in lines[start:] if not o.startswith(("Config search path", "provider="))]
            fail(f"{lines[0].removeprefix(chr(39).join(['In ', 'config', ': ']))}; available: {', '.join(options)}")
        key = lines[0].partition("Could not override '")[2].rstrip("'.")
        arg = next((a for a in overrides if key and a.split("=")[0].lstrip("+~") == key), None)
        if arg is not None:  # a key the config does not have
            fail(f"{arg}: unknown key (a typo?); to add a new key use +{arg}")
        fail("; ".join(lines[:2]))
