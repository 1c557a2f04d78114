"""The argument parser every ``swarmllm`` command uses: defaults in ``--help``, one-line
usage errors, and the exit codes the commands share."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_ERROR = 1  # a failure the message names (bad input file, a peer's error, ...)
EXIT_USAGE = 2  # wrong arguments (argparse's own code)
EXIT_UNREACHABLE = 3  # the swarm could not be joined, or an address to listen on is taken
EXIT_NOT_SERVED = 4  # the swarm lacks the model or some of its blocks
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it

EXIT_CODES_HELP = (
    f"exit codes: {EXIT_ERROR} error, {EXIT_USAGE} wrong arguments, {EXIT_UNREACHABLE} swarm "
    f"unreachable or address in use, {EXIT_NOT_SERVED} model or blocks not served, "
    f"{EXIT_INTERRUPTED} interrupted (Ctrl-C)"
)


class UsageError(ValueError):
    """Wrong arguments found after parsing; exits like argparse's own errors."""

    exit_code = EXIT_USAGE


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to each option's help unless it has no meaningful default or
    its help already names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
        ):
            return text
        shown = " ".join(default) if isinstance(default, list) else default
        return f"{text} (default: {shown})".strip()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (with a pointer to ``--help``), not the
    whole usage; subcommand parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def exit_code_of(error: Exception) -> int:
    """The exit code for a failure: the error's own ``exit_code``, or by its kind."""
    code = getattr(error, "exit_code", None)
    if isinstance(code, int):
        return code
    from swarmllm.client.connection import SwarmUnreachableError
    from swarmllm.client.model import ModelNotInSwarmError
    from swarmllm.client.routing import NoRouteError

    if isinstance(error, SwarmUnreachableError):
        return EXIT_UNREACHABLE
    if isinstance(error, ModelNotInSwarmError | NoRouteError):
        return EXIT_NOT_SERVED
    return EXIT_ERROR
