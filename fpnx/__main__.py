"""``python -m fpnx`` and the ``fpnx`` command: the command line of :mod:`fpnx.cli`.

Importing the command line imports torch (seconds); a Ctrl-C meanwhile prints one line too.
"""

import signal
import sys


def main() -> None:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    try:
        run()
    finally:  # the command is over: a Ctrl-C while Python shuts down (torch's exit handlers) prints nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
