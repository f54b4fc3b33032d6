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

from . import __version__

app = typer.Typer(name="qfinal", add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Take a transformers checkpoint the last mile: load, quantize or dequantize, tie, "
                       "adapt, and prove it correct.")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 70

# Options shared by several commands, declared once.
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file.")]
QuantizeOpt = Annotated[Optional[str], typer.Option(help="Quantize on load: none|nf4|fp4|int8.")]
DoubleQuantOpt = Annotated[Optional[bool], typer.Option("--double-quant/--no-double-quant",
                                                        help="Nested quantization for nf4/fp4.", show_default=False)]
DtypeOpt = Annotated[Optional[str], typer.Option(help="float16|bfloat16|float32 (default: from config.json).")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(help="cpu|auto.")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(help="Per-device budget for --device-map auto, e.g. 'cpu=2GiB,disk=20GiB'.")]
OffloadOpt = Annotated[Optional[str], typer.Option(help="Folder for disk offload.")]
AdapterOpt = Annotated[Optional[list[str]], typer.Option("--adapter", help="PEFT adapter folder (repeatable).")]
MergeOpt = Annotated[bool, typer.Option("--merge", help="Merge the adapters into the base weights.")]
DequantizeOpt = Annotated[bool, typer.Option("--dequantize", help="Dequantize a bnb checkpoint after loading.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow .bin/.pt pickle checkpoints "
                                              "(loaded with torch.load(weights_only=True) only).")]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="Write the report as JSON to FILE ('-' for stdout).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; rely on the exit code.")]
StopAfterOpt = Annotated[Optional[str], typer.Option(help="Stop the pipeline after this stage.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]
ShardOpt = Annotated[str, typer.Option(help="Largest output shard, e.g. 2GB or 500MB.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qfinal {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors.")] = False,
) -> None:
    if debug:
        os.environ["QFINAL_DEBUG"] = "1"


def parse_max_memory(text: str | None) -> dict | None:
    from .errors import ConfigError

    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        device, sep, amount = part.partition("=")
        if not sep or not device.strip() or not amount.strip():
            raise ConfigError(f"cannot parse {part!r}", where="--max-memory",
                              hint="use DEVICE=SIZE pairs, e.g. cpu=2GiB,disk=20GiB")
        device = device.strip()
        out[int(device) if device.isdigit() else device] = amount.strip()
    return out


def load_overrides(quantize, double_quant, dtype, device_map, max_memory, offload_folder, adapter, merge,
                   dequantize, stop_after=None) -> dict:
    """CLI flags -> the keyword overrides `qfinal.load` takes (None means: keep the YAML value)."""
    overrides = dict(quantize=quantize, double_quant=double_quant, dtype=dtype, device_map=device_map,
                     max_memory=parse_max_memory(max_memory), offload_folder=offload_folder,
                     stop_after=stop_after, dequantize=dequantize or None)
    if adapter:
        overrides["adapters"] = [{"path": p, "merge": merge} for p in adapter]
    elif merge:
        overrides["merge_all_adapters"] = True
    return overrides


from .commands import dequantize as _dequantize, load as _load, save as _save, validate as _validate  # noqa: E402
from .commands import diff as _diff, plan as _plan  # noqa: E402

app.command("load")(_load.load)
app.command("validate")(_validate.validate)
app.command("dequantize")(_dequantize.dequantize)
app.command("save")(_save.save)
app.command("diff")(_diff.diff)
app.command("plan")(_plan.plan)


def _one_line(text: str) -> str:
    """A message from a library may span lines; the error line must not."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> None:
    """The error boundary: user errors are one line and exit 2; bugs keep their traceback."""
    import typer

    from .errors import QfinalError

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
    """The `qfinal` console script (and `python -m qfinal`): `main()`, then `leave()`."""
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
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if "torch" not in sys.modules or run_exit_handlers is None:
        sys.exit(code)
    from .atomic import stop_sync_helper

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

