"""``python -m daemon`` and the ``wirekeep`` console script."""

import sys

from daemon.cli import main as _main


def main() -> None:
    sys.exit(_main())


if __name__ == "__main__":
    main()
