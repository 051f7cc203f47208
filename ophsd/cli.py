"""``ophsd train|eval|report ...``: one console script for the entry points."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

USAGE = """usage: ophsd COMMAND [args]

commands:
  train    the OPHSD trainer (same flags as `python -m ophsd.train`; launch with torchrun for N ranks)
  eval     standalone vs harness-attached evaluation (`python -m ophsd.eval`)
  report   RUN_DIR -> report.md + curves.png
"""


def writable_error(path, flag: str, directory: bool = False) -> str | None:
    """Why ``path`` (an output file, or a directory with ``directory``) cannot be written, or None.

    Checked before any work so that results are not lost at the end; by a real write probe, since
    permission bits say nothing for root and nothing about read-only mounts.
    """
    p = Path(path).expanduser()
    if directory and p.exists() and not p.is_dir():
        return f"{flag} {path}: exists and is not a directory"
    if not directory and p.is_dir():
        return f"{flag} {path}: is a directory, give a file"
    d = p if directory else p.parent
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        return f"{flag} {path}: {d} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
        if not directory and p.exists():
            open(p, "a").close()
    except OSError as e:
        return f"{flag} {path}: not writable ({e.strerror or e})"
    return None


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
