"""`sslsegment` command line. Each module in COMMAND_MODULES adds its sub-commands through `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "training.commands.core",
    "training.commands.demo",
    "training.commands.backend",
    "training.commands.la",
    "training.commands.web",
]


class CommandError(RuntimeError):
    """A user-facing error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslsegment", description="Semi-supervised 3D segmentation with uncertainty-guided review")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from SSLSegmentLib.data.volume import ImageError
    from SSLSegmentLib.ml.trainer import TrainingError

    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (CommandError, ImageError, FileNotFoundError, TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # unknown method names and the like
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
