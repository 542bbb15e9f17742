"""`python -m healthyluncher`, and the `luncher` command (through _healthyluncher_entry).

The command is imported and run inside a guard: Ctrl-C while its modules load (a
fraction of a second) or while typer builds the command ends with one line and exit
code 130, not a traceback.
"""

import atexit
import gc
import os
import sys


def run() -> None:
    # numpy's BLAS on one thread in luncher's own process, set before numpy loads: its
    # threads only contended with ONNX Runtime's, and starting them cost every command
    # about 0.08 s of CPU time (bench-results/blas-threads.md). A value the user set stays.
    # The library leaves the setting to the program that imports it (one for the whole
    # process, its other threads' numpy too).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # The process ends with the command, and Python's last garbage collections, which it
    # runs while it exits over every object typer, numpy and ONNX Runtime made, only
    # delay that end: about 25 ms of CPU time of every command. Frozen at exit (atexit runs
    # before them), those objects are simply left to the operating system; everything
    # else Python does on exit (atexit handlers, flushing stdout) still happens.
    atexit.register(gc.freeze)
    try:
        from healthyluncher.cli import main

        main()
    except KeyboardInterrupt:  # a command's own Ctrl-C is reported by cli_output.reporting
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    run()
