"""The `qfinal` command: parse, build a config, call the library, map errors to exit codes.

Exit codes: 0 fine; 1 a check failed (an error-severity finding, or a warning with
--fail-on warning); 2 usage error or bad/unsafe input; 70 a bug in qfinal (traceback printed).
Nothing heavy is imported here: `qfinal --help` must not pay for torch.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from qfinal import __version__
from qfinal.cli.commands import dequantize, diff, load, merge, plan, quantize, save, validate

app = typer.Typer(
    name="qfinal",
    add_completion=True,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Take a transformers checkpoint the last mile: load, quantize or dequantize, tie, "
    "adapt, and prove it correct.",
)

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 70


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qfinal {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors.")] = False,
) -> None:
    if debug:
        os.environ["QFINAL_DEBUG"] = "1"


app.command("load")(load.load)
app.command("validate")(validate.validate)
app.command("dequantize")(dequantize.dequantize)
app.command("save")(save.save)
app.command("diff")(diff.diff)
app.command("plan")(plan.plan)
app.command("quantize")(quantize.quantize)
app.command("merge")(merge.merge)


def _one_line(text: str) -> str:
    """A message from a library may span lines; the error line must not."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> None:
    """The error boundary: user errors are one line and exit 2; bugs keep their traceback."""
    import typer

    from qfinal.errors import QfinalError

    # typer >= 0.2x vendors click as typer._click: its exceptions derive from typer's, not click's.
    exits, aborts, usage_errors = (typer.Exit,), (typer.Abort,), (typer.TyperException,)
    try:
        import click
    except ImportError:
        pass
    else:
        exits += (click.exceptions.Exit,)
        aborts += (click.exceptions.Abort,)
        usage_errors += (click.ClickException,)

    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or bool(os.environ.get("QFINAL_DEBUG"))
    try:
        code = app(args=argv, prog_name="qfinal", standalone_mode=False)
    except QfinalError as err:
        if debug:  # the traceback, then the same line and exit code as without --debug
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"qfinal: error: {_one_line(err.line())}\n")
        sys.exit(err.exit_code)
    except exits as err:
        sys.exit(err.exit_code)
    except aborts:
        sys.stderr.write("qfinal: interrupted\n")
        sys.exit(130)
    except usage_errors as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `qfinal`: the help, as click prints it
            sys.stderr.write(err.format_message() + "\n")
            sys.exit(EXIT_USAGE)
        sys.stderr.write(f"qfinal: usage error: {_one_line(err.format_message())} (see qfinal --help)\n")
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        sys.stderr.write("qfinal: interrupted; nothing was left half-written\n")
        sys.exit(130)
    except Exception:
        import traceback

        traceback.print_exc()
        sys.stderr.write("qfinal: internal error (a bug in qfinal; please report it with the traceback above)\n")
        sys.exit(EXIT_BUG)
    if code == 130:  # typer turns KeyboardInterrupt into Exit(130) inside app()
        sys.stderr.write("qfinal: interrupted; nothing was left half-written\n")
    sys.exit(code if isinstance(code, int) else 0)


def console() -> None:
    """The `qfinal` console script (and `python -m qfinal`): `main()`, then `leave()`.

    SIGINT and SIGTERM are handled from here on (`python -m qfinal`: from before this module is
    imported): undo what was written, exit 130, without unwinding (checkpoint/interrupts.py)."""
    from qfinal.checkpoint.interrupts import install

    install()
    try:
        main()
    except SystemExit as done:
        leave(done.code)
    leave(0)


def leave(code) -> None:
    """Exit with `code` (as `sys.exit` reads it) without tearing the interpreter down.

    Once torch is loaded, Python's shutdown frees every module, tensor and mapping one by one:
    1.3-1.8 s after a 1.1B `qfinal save` on the 2-core bench machine, for memory the kernel takes
    back at once. Everything qfinal writes is closed and fsynced before this point; here the
    atexit handlers run (temporary folders, logging), stdout and stderr are flushed, then
    `os._exit`. Where another non-daemon thread still runs, or CPython has no atexit runner, the
    ordinary `sys.exit` lets the interpreter wait for it.
    """
    import atexit
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    from qfinal.checkpoint.interrupts import finish

    finish(code)  # what was published stays; a signal from now on exits with `code`
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if "torch" not in sys.modules or run_exit_handlers is None:
        sys.exit(code)
    from qfinal.checkpoint.atomic import stop_sync_helper

    stop_sync_helper()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`qfinal ... | head`): nothing more to say
            pass
    os._exit(code)
