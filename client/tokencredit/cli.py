"""`tokencredit`: the SDK's command line. Subcommands live with their features (`bo`: `tokencredit.bo.cli`).

The server has its own command, `tokencredit-server`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tokencredit.bo.cli import add_parser as add_bo  # argparse only: torch loads when a model is fitted

    parser = argparse.ArgumentParser(prog="tokencredit", description="TokenCredit SDK command line")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bo(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
