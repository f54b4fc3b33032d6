"""Where per-shard work runs: in this process (the default), on a local process pool, or on Ray.

A command that writes a checkpoint splits the work into one task per output shard: a top-level
(importable, so picklable by reference) function and one picklable spec per shard. Each task writes
its shard file into the run's temporary output folder (the caller's `atomic_dir`) and returns a
small picklable result. `run_tasks` returns the results in shard order whatever the executor, so
the caller writes the same index and publishes the same bytes every time.

A task that raises, or whose worker dies (a signal, `os._exit`, the OOM killer), fails the run with
its shard named; the other tasks are stopped first, so that `atomic_dir` removes a temporary folder
nothing still writes into, and nothing is published.

* `inprocess`: one task after another, here.
* `pool`: N long-lived local processes (`forkserver`, else `spawn`: torch and `fork` do not mix),
  each shard sent to whichever is idle. A dead worker's shard is known, so the error names it.
* `ray`: the Ray cluster this process already joined (`ray.init`), else an existing one at
  `--address`, `RAY_ADDRESS`, or the local one `ray start --head` made. Its workers must see this
  machine's paths (shared storage) and import the same qfinal; Ray retries nothing here.

Inside a task, `advance(n)` reports n more units (tensors) done, for a progress bar: it reaches the
bar in-process and from the pool; on Ray a shard's units count when it finishes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from qfinal.errors import ConfigError, QfinalError

KINDS = ("inprocess", "pool", "ray")
Progress = Callable[[int, int], None]  # (units done, units in all)
STOP_SECONDS = 30.0  # how long a failed run waits for its other tasks to stop


@dataclass(frozen=True)
class Executor:
    """Where tasks run. `workers`: the pool's size, or on Ray the most tasks in flight (None: all)."""

    kind: str = "inprocess"
    workers: int | None = None
    address: str | None = None


def make_executor(executor: str | None = None, workers: int | None = None, address: str | None = None) -> Executor:
    """The Executor for `--executor`, `--workers`, `--address`. `--workers N` alone means a pool of
    N processes; a pool without `--workers` has one per CPU this process may use."""
    if executor is not None and executor not in KINDS:
        raise ConfigError(f"unknown executor {executor!r}", where="--executor", hint="use inprocess, pool or ray")
    if workers is not None and workers < 1:
        raise ConfigError(f"needs at least 1 worker, not {workers}", where="--workers")
    kind = executor or ("pool" if workers is not None else "inprocess")
    if address is not None and kind != "ray":
        raise ConfigError("names a Ray cluster", where="--address", hint="add --executor ray")
    if kind == "inprocess" and workers not in (None, 1):
        raise ConfigError("in-process runs one shard at a time", where="--workers", hint="use --executor pool")
    if kind == "pool" and workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if kind == "ray" and importlib.util.find_spec("ray") is None:  # one line before any work, not mid-run
        raise ray_missing()
    return Executor(kind, workers, address)


def ray_missing() -> ConfigError:
    return ConfigError(
        "Ray is not installed", where="--executor ray", hint="pip install 'qfinal[ray]', or use --workers N"
    )


@dataclass
class TaskStats:
    """What a run's worker processes report besides their results: the largest peak RSS of one
    (0 when the tasks ran in this process, whose own peak the caller measures)."""

    worker_peak_bytes: int = 0


class TaskError(RuntimeError):
    """A task raised something other than a QfinalError (a bug): the shard named, the worker's
    traceback attached."""


class WorkerLost(QfinalError):
    """The process running a task died (a signal, `os._exit`, the OOM killer)."""


# --------------------------------------------------------------------------- inside a task

_reporter: Callable[[int], None] | None = None


def advance(n: int = 1) -> None:
    """Called by a task as it finishes `n` more units of its shard; for progress only."""
    if _reporter is not None:
        _reporter(n)


def outcome(fn: Callable[[Any], Any], spec: Any) -> tuple[str, Any, int]:
    """`fn(spec)` as data, ("ok", result) or ("error", what it raised), so that an exception that
    does not pickle still comes back from a worker, with its traceback as text; and the worker's
    peak RSS so far."""
    from qfinal.sizes import peak_rss_bytes

    try:
        return "ok", fn(spec), peak_rss_bytes()
    except Exception as err:
        return "error", describe_error(err), peak_rss_bytes()


def describe_error(err: Exception) -> dict:
    info = {"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()}
    if isinstance(err, QfinalError):
        info.update(qfinal=type(err), what=err.what, where=err.where, hint=err.hint)
    found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(err))  # safetensors' write errors
    if isinstance(err, OSError) and err.errno is not None:
        info.update(errno=err.errno, strerror=err.strerror, filename=err.filename)
    elif type(err).__name__ == "SafetensorError" and found:
        info.update(errno=int(found.group(2)), strerror=found.group(1), filename=None)
    return info


def task_failure(info: dict, label: str) -> Exception:
    """What the run raises for a task's error: a QfinalError keeps its class, place and hint, the
    shard added; anything else is a TaskError carrying the worker's traceback."""
    if info.get("errno") is not None:  # the destination failed the write: atomic_dir says so in one line
        return OSError(info["errno"], f"{info['strerror']} (writing {label})", info["filename"])
    cls = info.get("qfinal")
    if cls is not None:
        try:
            return cls(f"{info['what']} (writing {label})", where=info["where"], hint=info["hint"])
        except Exception:  # a subclass with another constructor
            pass
    err = TaskError(f"{label}: {info['type']}: {info['message']}")
    err.add_note(f"in the worker:\n{info['traceback'].rstrip()}")
    return err


def worker_lost(label: str, cause: str) -> WorkerLost:
    return WorkerLost(
        f"the worker writing this shard died ({cause}); nothing was written",
        where=label,
        hint="out of memory? use fewer --workers or a smaller --max-shard-size, or run it again",
    )


class Meter:
    """Units done, told to `progress`. A finished shard tops its count up to its share, so the total
    is right whether or not its task reported as it went."""

    def __init__(self, units: Sequence[int], progress: Progress | None):
        self.units, self.progress = list(units), progress
        self.total, self.done = sum(self.units), 0
        self.reported = [0] * len(self.units)
        self.worker_peak = 0  # bytes, the largest a worker process reported

    def advance(self, index: int, n: int) -> None:
        n = max(0, min(n, self.units[index] - self.reported[index]))
        if n:
            self.reported[index] += n
            self.done += n
            if self.progress is not None:
                self.progress(self.done, self.total)

    def finished(self, index: int) -> None:
        self.advance(index, self.units[index] - self.reported[index])


# --------------------------------------------------------------------------- running them


def run_tasks(
    fn: Callable[[Any], Any],
    specs: Sequence[Any],
    executor: Executor | None = None,
    *,
    labels: Sequence[str],
    units: Sequence[int] | None = None,
    progress: Progress | None = None,
    preload: Sequence[str] = (),
    stats: TaskStats | None = None,
) -> list:
    """`[fn(spec) for spec in specs]` on `executor`, in shard order. `labels` name the shards in
    errors; `units[i]` is shard i's share of `progress(done, total)` (default: 1 each). `preload`:
    modules every pool worker needs, imported once by the forkserver instead of once per worker
    (the first pool of a process sets them). `stats` gets what the workers reported."""
    executor = executor or Executor()
    units = list(units) if units is not None else [1] * len(specs)
    if not len(specs) == len(labels) == len(units):
        raise ValueError("specs, labels and units differ in length")
    if not specs:
        return []
    meter = Meter(units, progress)
    if executor.kind == "inprocess":
        return _run_inprocess(fn, specs, labels, meter)
    if executor.kind == "pool":
        from qfinal.ops.executor_pool import run_pool

        results = run_pool(fn, specs, labels, meter, executor.workers or 1, preload)
    elif executor.kind == "ray":
        from qfinal.ops.executor_ray import run_ray

        results = run_ray(fn, specs, labels, meter, executor)
    else:
        raise ConfigError(f"unknown executor {executor.kind!r}", where="--executor", hint="use inprocess, pool or ray")
    if stats is not None:
        stats.worker_peak_bytes = meter.worker_peak
    return results


def worker_peak_note(peak: int) -> str:
    """'; each worker peaked at 612 MiB (at most)' for a stage's detail, '' when the tasks ran here."""
    return f"; each worker peaked at {peak / 2**20:.0f} MiB (at most)" if peak else ""


def _run_inprocess(fn, specs, labels, meter: Meter) -> list:
    global _reporter
    results, previous = [], _reporter
    try:
        for index, spec in enumerate(specs):
            _reporter = lambda n, index=index: meter.advance(index, n)  # noqa: E731
            try:
                results.append(fn(spec))
            except Exception as err:
                raise task_failure(describe_error(err), labels[index]) from err
            meter.finished(index)
    finally:
        _reporter = previous
    return results


def report_to(reporter: Callable[[int], None] | None) -> None:
    """Where `advance` goes in this process: a pool worker sends it to the parent."""
    global _reporter
    _reporter = reporter
