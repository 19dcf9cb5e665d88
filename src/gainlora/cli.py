"""The command line's error lines: one ``error:`` line and exit code 2 for what the user got wrong,
from Hydra's override parsing (before ``run.main`` runs) to a full disk."""
from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def error_line(message: str) -> int:
    """Print the one ``error:`` line of a user mistake; the exit code to return (2). Line breaks that a
    value or a library's message carries are escaped, so it stays one line."""
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    print(f"error: {message}", file=sys.stderr)
    return 2


def fail(message: str) -> NoReturn:
    sys.exit(error_line(message))


# argparse's messages -> ``key=value: what is accepted`` ({prog}: the command, for --help)
ARGPARSE_MESSAGES = (
    (r"argument (\S+?)(?:/\S+)?: invalid choice: '(.*)' \(choose from (.*)\)", r"\1=\2: expected one of \3"),
    (r"argument (\S+?)(?:/\S+)?: invalid (\w+) value: '(.*)'", r"\1=\3: a valid \2"),
    (r"argument (\S+?)(?:/\S+)?: expected one argument", r"\1: needs a value"),
    (r"argument (\S+?)(?:/\S+)?: not allowed with argument (.*)", r"\1: not allowed with \2"),
    (r"argument (\S+?)(?:/\S+)?: (.*)", r"\1=\2"),  # a type's ArgumentTypeError: "value: accepted"
    (r"the following arguments are required: (.*)", r"\1: required; see {prog} --help"),
    (r"unrecognized arguments: (.*)", r"\1: unknown arguments; see {prog} --help"),
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (a missing argument, ``--batch-size abc``) are one ``error:`` line and
    exit code 2, without the usage block (``--help`` still prints it)."""

    def error(self, message: str) -> NoReturn:
        for pattern, form in ARGPARSE_MESSAGES:
            if re.fullmatch(pattern, message):
                message = re.sub(pattern, form.replace("{prog}", self.prog), message).replace("'", "")
                break
        fail(message)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    if not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: a positive integer")
    return int(text)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text}: a positive number")
    return value


def writable_file(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file (checked before hours of work would be lost), or None."""
    if path.is_dir():
        return "a directory; give a file path"
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        return f"{parent} is not a directory"
    try:  # a real write: access() says yes to root even on a read-only mount
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        return f"{parent} cannot be written ({err.strerror})"
    return None


def preset_note(message: str, conf_dir: Path) -> str:
    """A refused value the user never typed may come from the ``debug`` preset (debug=cpu_tiny sets
    benchmark.num_tasks=2, refused for a one-task stream): say so, so the line names what to override."""
    from hydra.core.hydra_config import HydraConfig

    key, sep, _ = message.partition("=")
    if not sep or not HydraConfig.initialized():
        return message
    hydra = HydraConfig.get()
    typed = {o.partition("=")[0].lstrip("+~") for o in hydra.overrides.task}
    preset = hydra.runtime.choices.get("debug")
    path = conf_dir / "debug" / f"{preset}.yaml"
    if key in typed or not preset or not path.is_file() or OmegaConf.select(OmegaConf.load(path), key) is None:
        return message
    return f"{message} (debug={preset} sets {key}; override it on the command line)"


def disk_full(err: BaseException) -> BaseException | None:
    """The ENOSPC error behind ``err``, if any. Libraries wrap I/O errors in their own, some only
    in text (safetensors: "I/O error: No space left on device (os error 28)")."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def group_options(group: Path) -> list[str]:
    """The options of a config group: its folder's YAML files, by name."""
    return sorted(p.stem for p in group.glob("*.yaml"))


def check_overrides(conf_dir: Path, overrides: list[str]) -> None:
    """Hydra reports a bad override (a typo'd key, an unknown group option) in several lines and
    exits 1 before ``main`` runs; compose first, so it is one ``error:`` line and exit 2 as well."""
    for arg in overrides:  # a group option is a file's name: experiment=../conf/config composed the root config
        key, _, value = arg.partition("=")
        group = conf_dir / key.lstrip("+")
        if group.is_dir() and ("/" in value or value.startswith(".")):
            fail(f"{arg.lstrip('+')}: one of {', '.join(group_options(group))} (an option's "
                 "name, not a path)")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            compose("config", overrides=overrides)
    except OverrideParseException as err:  # name the override Hydra's grammar rejects
        parser = OverridesParser.create()
        for arg in overrides:
            try:
                parser.parse_override(arg)
            except HydraException:
                fail(f"{arg}: not an override Hydra can parse ({str(err).splitlines()[0].strip()})")
        fail(str(err).splitlines()[0])
    except ValueError as err:  # Hydra's plain ValueError: a config group set to null (logger=null)
        for override in OverridesParser.create().parse_overrides(overrides):
            group = conf_dir / override.get_key_element()
            if override.value() is None and group.is_dir():
                fail(f"{override.input_line}: one of {', '.join(group_options(group))} (a config group takes an "
                     "option's name)")
        fail(str(err).splitlines()[0])
    except (HydraException, OmegaConfBaseException) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if any(line.startswith("Available options") for line in lines):  # an unknown group option
            start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
            options = [o for o in lines[start:] if not o.startswith(("Config search path", "provider="))]
            missing = re.search(r"Could not find '(.+)/([^/']+)'", lines[0])
            if missing:  # the documented form: <group>=<value>: what is accepted
                fail(f"{missing[1].replace('/', '.')}={missing[2]}: one of {', '.join(options)}")
            fail(f"{lines[0].removeprefix(chr(39).join(['In ', 'config', ': ']))}; available: {', '.join(options)}")
        key = lines[0].partition("Could not override '")[2].partition("'")[0]
        arg = next((a for a in overrides if key and a.split("=")[0].lstrip("+~") == key), None)
        if arg is not None and (conf_dir / key).is_dir():  # a group the defaults do not list (recipe)
            fail(f"{arg}: {key} is not in the defaults list; add it with +{key}=NAME (one of "
                 f"{', '.join(group_options(conf_dir / key))})")
        if arg is not None:
            try:
                with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
                    held = OmegaConf.select(compose("config", overrides=[a for a in overrides if a != arg]), key)
            except (HydraException, OmegaConfBaseException):  # another override is wrong too
                held = None
            if isinstance(held, DictConfig):  # the key exists: a mapping assigned to it brought new keys
                fail(f"{arg}: {key} holds {', '.join(map(str, held)) or 'no keys'}; add one with +{key}.NAME=VALUE, "
                     f"drop one with ~{key}.NAME")
            fail(f"{arg}: unknown key (a typo?); to add a new key use +{arg}")
        fail("; ".join(lines[:2]))
