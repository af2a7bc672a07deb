"""How every script starts and ends: the project's errors and interruptions as one line, never a traceback.

    if __name__ == "__main__":
        run_script(main)

`--debug` anywhere on the command line keeps Python's traceback (it is taken out before the script sees it).
"""
from __future__ import annotations

import sys
from typing import Callable

from utils.errors import UserError
from utils.interrupt import Interrupted

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # the shell's status for a process stopped by SIGINT


def run_script(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; exit with `main`'s int result, or 0. A `UserError` prints `error: <message>` and exits 2;
    an interruption (`Interrupted`, or Ctrl-C that `main` did not handle itself) prints one line and exits 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        result = main(argv)
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_STATUS)
    sys.exit(result if isinstance(result, int) else 0)
