"""The `advantage` command line: argument parsing, one-line errors, exit codes.

Exit codes: 0 success; 1 a check or job ran and failed; 2 a usage error the user can fix (printed as one line).
"""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """An error the user caused (bad flag value, bad file, unknown name): printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = _Parser(prog="advantage", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    verify = commands.add_parser(
        "verify", help="check the seeds' estimators against exact values on enumerable problems",
        description="Run the exact checks: the policy gradient of an enumerated MDP for every psi form, the DPO "
                    "optimum, and the KL estimators. Prints a table; exit code 0 only if every row passes.")
    verify.add_argument("--seed", type=_positive_int, default=0, help="seed of the random problems (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `advantage` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            from advantage.verify import main as verify_main

            return verify_main(seed=args.seed)
    except UsageError as error:
        print(f"advantage: error: {error}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
