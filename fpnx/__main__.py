"""``python -m fpnx``: the same command line as ``fpnx``."""

from .cli import main

if __name__ == "__main__":
    main()
