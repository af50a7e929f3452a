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


# After a kill -9, multiprocessing's resource tracker (a process of its own) removes the semaphores and shared
# memory the run left, as it should, and warns "There appear to be 5 leaked semaphore objects": expected after a
# kill, alarming to read. The tracker starts with the warning options of this process.
QUIET_RESOURCE_TRACKER = "ignore:resource_tracker:UserWarning"


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    if QUIET_RESOURCE_TRACKER not in sys.warnoptions:  # once, also where main() runs again in one process
        sys.warnoptions.append(QUIET_RESOURCE_TRACKER)
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
