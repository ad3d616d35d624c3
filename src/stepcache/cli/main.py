"""``stepcache`` command line: thin subcommands that parse, build configs and call the library.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` (which sets
``func`` on its parser). Any :class:`stepcache.StepcacheError` (and bad file input) ends in one
sentence on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from stepcache.errors import StepcacheError

SUBCOMMANDS = ["sample", "demo", "bench", "train_router", "router_report", "sample_ddp", "eval", "calibrate", "tune",
               "generate", "convert"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option ends in one line (with a pointer to --help) and exit 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help).\n")


def build_parser() -> argparse.ArgumentParser:
    from stepcache import __version__

    parser = OneLineParser(prog="stepcache", description="Training-free feature caching for diffusion "
                                     "transformers: FORA, ToCa and Learning-to-Cache.")
    parser.add_argument("--version", action="version", version=f"stepcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"stepcache.cli.{name}").add_parser(sub)
    return parser


class CLIError(StepcacheError):
    """A bad command-line value."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (StepcacheError, OSError) as exc:
        # OSErrors that no loader turned into a sentence: say which file and what, not whether reading or writing
        msg = str(exc) if isinstance(exc, StepcacheError) else f"{exc.filename or 'a file'}: {exc.strerror or exc}."
        print(f"stepcache: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stepcache: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
