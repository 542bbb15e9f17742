"""`python -m healthyluncher`, and the `luncher` command (through _healthyluncher_entry).

The command is imported and run inside a guard: Ctrl-C while its modules load (a
fraction of a second) or while typer builds the command ends with one line and exit
code 130, not a traceback.
"""

import atexit
import gc
import os
import sys


def run(*, own_process: bool = False) -> None:
    """Run `luncher`. `own_process`: the process is luncher's alone (its console script,
    `python -m healthyluncher`), which lets it pause the garbage collector as it starts."""
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
    # While the modules of typer, numpy, ONNX Runtime and the command load, the collector
    # went over their objects some 70 times (about 10 ms of every command) for the ~500 of
    # ~29,000 it could free (`status`). In luncher's own process it is off until the command
    # starts, and on again from there with those objects frozen (cli_output.reporting): it
    # goes over the command's own objects, as before.
    paused = own_process and gc.isenabled()
    if paused:
        gc.disable()
    try:
        from healthyluncher.cli import main
        from healthyluncher.cli_output import collector_paused

        collector_paused[0] = paused
        main()
    except KeyboardInterrupt:  # a command's own Ctrl-C is reported by cli_output.reporting
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    run(own_process=True)
