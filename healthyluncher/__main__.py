"""`python -m healthyluncher`, and the `luncher` command (through _healthyluncher_entry).

The command is imported and run inside a guard: Ctrl-C while its modules load (a
fraction of a second) or while typer builds the command ends with one line and exit
code 130, not a traceback.
"""

import os
import sys


def run() -> None:
    # numpy's BLAS on one thread in luncher's own process, set before numpy loads: its
    # threads only contended with ONNX Runtime's, and starting them cost every command
    # about 0.08 s of CPU time (bench-results/blas-threads.md). A value the user set stays.
    # The library leaves the setting to the program that imports it (one for the whole
    # process, its other threads' numpy too).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        from healthyluncher.cli import main

        main()
    except KeyboardInterrupt:  # a command's own Ctrl-C is reported by cli_output.reporting
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    run()
