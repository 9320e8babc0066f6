"""What the command lines in scripts/ share: one way to give up, in one line.

Standard library only: scripts import it before the heavy libraries load."""

import sys
from pathlib import Path
from typing import NoReturn


def fail(message, status: int = 1) -> NoReturn:
    """Print `<script>: error: <message>` on stderr and exit with `status` (argparse's own errors
    look the same and exit 2)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(status)
