"""``python -m lab demo [--keep] [--netns] [--quiet]``: the lab's command line.

``portolan demo`` execs this (portolan does not import lab: see HACKING.md, "lab/").
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = "usage: python -m lab demo [--keep] [--netns] [--quiet]"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "demo":
        print(USAGE, file=sys.stderr)
        return 2
    from lab.demo import cli

    return cli(args[1:])


if __name__ == "__main__":
    sys.exit(main())
