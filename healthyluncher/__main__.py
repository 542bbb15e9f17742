"""`python -m healthyluncher` and the `luncher` command.

The entry point imports the command inside a guard: Ctrl-C while its modules load (a
fraction of a second) ends with one line and exit code 130, not a traceback.
"""

import sys


def run() -> None:
    try:
        from healthyluncher.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    main()


if __name__ == "__main__":
    run()
