"""The ``trt-sd`` console script.

Only the chosen subcommand's module is imported, so ``trt-sd run`` works where only the runtime
is installed and ``trt-sd export`` pays for torch only when it is used. Each subcommand module
exposes ``add_arguments(parser)`` (importable without heavy dependencies) and
``main(args) -> int``.

Errors raised on purpose (:class:`trt_sd.models.TrtSdError`, and the ``ValueError`` the
NumPy-only samplers raise for bad arguments) become one ``error: ...`` line on stderr and exit
code 2. Set ``TRT_SD_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": (
        "trt_sd.export.cli",
        "export a checkpoint to an engine directory (needs the export extra)",
    ),
    "run": ("trt_sd.runtime.run_cli", "generate images from an engine directory"),
    "samplers": ("trt_sd.samplers.cli", "list the available samplers"),
    "serve": ("trt_sd.runtime.serve_cli", "serve an engine directory over HTTP (Ray Serve)"),
}

EXIT_USAGE = 2


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: trt-sd COMMAND [options]", "", "commands:"]
    lines += [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
    lines += ["", "Run `trt-sd COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trt-sd")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else EXIT_USAGE
    if argv[0] == "--version":
        print(f"trt-sd {_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(
            f"error: unknown command {name!r}{hint}; choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if (e.name or "").startswith("trt_sd"):  # a broken install of trt-sd itself
            raise
        extra = {"export": "export", "serve": "serve"}.get(name, "cpu")
        print(
            f"error: `trt-sd {name}` needs packages that are not installed ({e.name or e}); "
            f"install them with: pip install 'trt-sd[{extra}]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    parser = OneLineParser(prog=f"trt-sd {name}", description=help_text)
    module.add_arguments(parser)
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:  # --help (0) or a bad flag (2, already reported on one line)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    return run_guarded(module.main, args)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error:`` line (and exit 2) instead of the usage block:
    the same shape as every other trt-sd error, and what a script's log can show whole."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def debug() -> bool:
    """``TRT_SD_DEBUG=1`` (any value but empty or 0): tracebacks instead of one-line errors."""
    return os.environ.get("TRT_SD_DEBUG", "") not in ("", "0")


def run_guarded(fn, *args) -> int:  # type: ignore[no-untyped-def]
    """Call ``fn(*args)`` turning intended errors into one line on stderr and exit code 2."""
    from trt_sd.models.errors import TrtSdError

    try:
        return int(fn(*args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (TrtSdError, ValueError) as e:
        if debug():
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
