"""Per-shard tasks on a Ray cluster (`--executor ray`, `ops.executors`).

The cluster this process already joined (`ray.init`), else an existing one at `--address`,
`RAY_ADDRESS`, or the local one `ray start --head` made: qfinal never starts one behind the
user's back. Every worker must see this machine's paths for SRC and OUT (shared storage) and import
the same qfinal. Tasks are not retried: a lost worker fails the run, naming its shard.
"""

from __future__ import annotations

import os

from qfinal.errors import ConfigError
from qfinal.ops.executors import STOP_SECONDS, Executor, Meter, outcome, ray_missing, task_failure, worker_lost


def import_ray():
    """Ray, or one line saying how to install it (exit 2)."""
    try:
        import ray
    except ImportError:
        raise ray_missing() from None
    return ray


def _join_ray(ray, address: str | None) -> None:
    """Connect to an existing cluster, quietly; never start one behind the user's back."""
    import logging

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"cannot join a Ray cluster at {address!r} ({_ray_cause(err)})",
            where="--executor ray",
            hint="start one with `ray start --head` (shared storage for SRC and OUT), or pass --address HOST:PORT",
        ) from None


def run_ray(fn, specs, labels, meter: Meter, executor: Executor) -> list:
    ray = import_ray()
    joined = not ray.is_initialized()
    if joined:
        _join_ray(ray, executor.address)
    try:
        return _run_all(ray, fn, specs, labels, meter, executor.workers or len(specs))
    finally:
        if joined:
            ray.shutdown()


def _run_all(ray, fn, specs, labels, meter: Meter, limit: int) -> list:
    """At most `limit` tasks in flight; results in shard order; the first failure stops the rest."""
    task = ray.remote(num_cpus=1, max_retries=0)(outcome)
    results: list = [None] * len(specs)
    queue, running = list(range(len(specs)))[::-1], {}  # ref -> shard index
    try:
        while queue or running:
            while queue and len(running) < limit:
                index = queue.pop()
                running[task.remote(fn, specs[index])] = index
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                index = running.pop(ref)
                try:
                    status, value, peak = ray.get(ref)
                except ray.exceptions.RayError as err:
                    raise worker_lost(labels[index], _ray_cause(err)) from None
                meter.worker_peak = max(meter.worker_peak, peak)
                if status != "ok":
                    raise task_failure(value, labels[index])
                results[index] = value
                meter.finished(index)
    except BaseException:
        _cancel(ray, list(running))
        raise
    return results


def _ray_cause(err) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{type(err).__name__}: {first}"


def _cancel(ray, refs: list) -> None:
    """Stop the tasks still in flight and wait for them to end: interrupted first (their workers
    stay, warm), killed if they do not stop."""
    for force in (False, True):
        if not refs:
            return
        for ref in refs:
            try:
                ray.cancel(ref, force=force)
            except Exception:
                pass
        try:
            _done, refs = ray.wait(refs, num_returns=len(refs), timeout=STOP_SECONDS / 2)
        except Exception:
            return
