"""``ophsd train|eval|report ...``: one console script for the entry points."""
from __future__ import annotations

import sys

USAGE = """usage: ophsd COMMAND [args]

commands:
  train    the OPHSD trainer (same flags as `python -m ophsd.train`; launch with torchrun for N ranks)
  eval     standalone vs harness-attached evaluation (`python -m ophsd.eval`)
  report   RUN_DIR -> report.md + curves.png
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from ophsd.train.main import main as run
    elif cmd == "eval":
        from ophsd.eval import main as run
    elif cmd == "report":
        from ophsd.train.report import main as run
    else:
        print(f"ophsd: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
