"""All terminal output goes through here: human (rich), JSON, or quiet.

Progress is shown only on an interactive terminal, never in CI (`CI` set) or with --json/--quiet.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def quiet_libraries() -> None:
    """transformers prints its own progress bars and load report; qfinal's report replaces them.

    Without importing transformers, which a command may never need (dequantize of a model
    without Conv1D): until it is imported, the environment variables it reads on import say the
    same. A TRANSFORMERS_VERBOSITY the user set is kept."""
    import logging
    import os
    import sys
    import warnings

    # bitsandbytes logs that an optional CPU kernel package is absent, on every 4-bit import.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Libraries' warnings (transformers' `is_gradient_checkpointing` FutureWarning on every adapter
    # load, bnb's cast notices) are noise for qfinal's users: what matters becomes a finding in the
    # report. --debug lets them through. Code that turns warnings into findings records them itself.
    if not os.environ.get("QFINAL_DEBUG"):
        warnings.simplefilter("ignore")

    verbosity_set = "TRANSFORMERS_VERBOSITY" in os.environ
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if not verbosity_set:
            hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return
    if not verbosity_set:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "huggingface_hub" in sys.modules:  # it read its environment already
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class Output:
    def __init__(self, *, json_path: str | None = None, quiet: bool = False):
        self.json_path = json_path
        self.json_to_stdout = json_path == "-"
        self.quiet = quiet or self.json_to_stdout
        from rich.console import Console

        self.console = Console(stderr=False, highlight=False, soft_wrap=False)
        self.err = Console(stderr=True, highlight=False)

    @property
    def interactive(self) -> bool:
        """Progress is for a person at a terminal: not in CI, not for a machine reading --json."""
        return (
            not self.quiet
            and not self.json_path
            and sys.stderr.isatty()
            and not os.environ.get("CI")
            and os.environ.get("TERM") != "dumb"
        )

    @contextmanager
    def stages(self, names: list[str]) -> Iterator[Steps | None]:
        """Yield a Steps callback (None off a terminal): a bar over the steps, and beneath it one over
        the work inside the current step when the step reports any (tensors read, bytes written)."""
        if not self.interactive:
            yield None
            return
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=self.err,
            transient=True,
        ) as progress:
            yield Steps(progress, names)

    def report(self, report, *, junit_path: str | None = None, fail_on: str = "error") -> None:
        from qfinal.render.json_report import to_json, write_json

        if self.json_path and not self.json_to_stdout:
            write_json(report, Path(self.json_path))
        if junit_path:
            from qfinal.render.junit import write_junit

            write_junit(report, Path(junit_path), fail_on)
        if self.json_to_stdout:
            sys.stdout.write(to_json(report))
        elif not self.quiet:
            from qfinal.render.rich_report import render

            render(report, self.console)


class Steps:
    """`steps(name)` starts the next step; `steps.within(done, total, what)` shows the work inside it.

    Every update is drawn at once (refresh=True): a step shorter than rich's refresh interval still
    shows on the terminal."""

    def __init__(self, progress, names: list[str]):
        self.progress = progress
        self.task = progress.add_task("starting", total=len(names))
        self.inner = None
        self.started = 0

    def __call__(self, name: str) -> None:
        if self.started:
            self.progress.advance(self.task)
        self.started += 1
        if self.inner is not None:
            self.progress.remove_task(self.inner)
            self.inner = None
        self.progress.update(self.task, description=name, refresh=True)

    def counter(self, what: str):
        """A `progress(done, total)` callback drawing `within(done, total, what)`."""
        return lambda done, total: self.within(done, total, what)

    def within(self, done: int, total: int | None, what: str = "") -> None:
        if self.inner is None:
            self.inner = self.progress.add_task(f"  {what}", total=total)
        self.progress.update(self.inner, completed=done, total=total, description=f"  {what}", refresh=True)
