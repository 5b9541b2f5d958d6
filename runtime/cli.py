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

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": (
        "trt_sd.export.cli",
        "export a checkpoint to an engine directory (needs the export extra)",
    ),
    "run": ("trt_sd.runtime.run_cli", "generate images from an engine directory"),
    "samplers": ("trt_sd.samplers.cli", "list the available samplers"),
    "bench": ("trt_sd.runtime.bench_cli", "time the engines of an engine directory"),
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
        extra = {"export": "export", "serve": "serve"}.get(name, "cpu")
        print(
            f"error: `trt-sd {name}` needs packages that are not installed ({e.name or e}); "
            f"install them with: pip install 'trt-sd[{extra}]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    parser = argparse.ArgumentParser(prog=f"trt-sd {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)  # argparse itself exits 2 with one line on bad flags
    return run_guarded(module.main, args)


def run_guarded(fn, *args) -> int:  # type: ignore[no-untyped-def]
    """Call ``fn(*args)`` turning intended errors into one line on stderr and exit code 2."""
    from trt_sd.models.errors import TrtSdError

    try:
        return int(fn(*args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (TrtSdError, ValueError) as e:
        if os.environ.get("TRT_SD_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
