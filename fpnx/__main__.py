"""``python -m fpnx`` and the ``fpnx`` command: the command line of :mod:`fpnx.cli`.

Importing the command line imports torch (seconds); a Ctrl-C or SIGTERM meanwhile prints one line too.
"""

import signal
import sys


class Terminated(KeyboardInterrupt):
    """SIGTERM before a run takes the signal over (while torch is imported, the model built): it stops the command
    as Ctrl-C does, with exit code 143 rather than a silent death by the signal."""

    signum = signal.SIGTERM


def _terminated(signum, frame) -> None:
    raise Terminated


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        from .cli import main as run
    except KeyboardInterrupt as interrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(128 + getattr(interrupt, "signum", signal.SIGINT)) from None
    try:
        run()
    finally:  # the command is over: a signal while Python shuts down (torch's exit handlers) prints nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    main()
