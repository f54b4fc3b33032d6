"""The local process pool behind `--workers N` (`ops.executors`).

N long-lived worker processes started by `forkserver` (its server imports the task's module and
the caller's `preload` once, each worker is a fork of it; `spawn` where there is no forkserver),
each fed one shard at a time over a pipe. The parent knows which shard each worker runs, so a worker
that dies names its shard; on any failure the workers are killed before the error is raised.
"""

from __future__ import annotations

import signal
from typing import Sequence

from qfinal.ops.executors import STOP_SECONDS, Meter, describe_error, outcome, report_to, task_failure, worker_lost


def _pool_worker(conn, fn) -> None:
    """One pool process: run each (index, spec) it is sent until told to stop (None) or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the whole group: the parent stops us
    current = [None]
    report_to(lambda n: conn.send(("advance", current[0], n)))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        current[0], spec = job
        status, value, peak = outcome(fn, spec)
        try:
            conn.send(("done", current[0], status, value, peak))
        except Exception as err:  # a result that does not pickle
            conn.send(("done", current[0], "error", describe_error(err), peak))


def _pool_context(fn, preload: Sequence[str]):
    """forkserver (its server imports the task's module and `preload` once; each worker is a fork
    of it), else spawn."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["qfinal.ops.executors", __name__, fn.__module__, *preload])
    return ctx


def _stop(procs: list, conns: list, *, kill: bool) -> None:
    for proc, conn in zip(procs, conns):
        try:
            if proc.pid is None:
                continue
            if kill:
                proc.kill()
            else:
                conn.send(None)
        except (OSError, ValueError, AttributeError):
            pass
    for proc in procs:
        if proc.pid is None:  # its start failed
            continue
        proc.join(STOP_SECONDS)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()


def _kill_now(procs: list) -> None:
    """The CLI's ^C undo: the workers end before their temporary folder is removed."""
    for proc in procs:
        if proc.pid is not None:
            proc.kill()
    for proc in procs:
        if proc.pid is not None:
            proc.join(5)


def run_pool(fn, specs, labels, meter: Meter, workers: int, preload: Sequence[str]) -> list:
    from qfinal.checkpoint import interrupts

    ctx = _pool_context(fn, preload)
    procs, conns = [], []
    with interrupts.critical():  # a ^C in the CLI kills the workers before it removes the folder
        token = interrupts.on_interrupt(lambda: _kill_now(procs))
    ok = False
    try:
        for _ in range(min(workers, len(specs))):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_pool_worker, args=(theirs, fn), name="qfinal-worker", daemon=True)
            procs.append(proc)
            conns.append(mine)
            proc.start()
            theirs.close()
        results = _schedule(specs, labels, meter, procs, conns)
        ok = True
        return results
    finally:
        _stop(procs, conns, kill=not ok)
        with interrupts.critical():
            interrupts.forget(token)


def _schedule(specs, labels, meter: Meter, procs: list, conns: list) -> list:
    """Send each shard to an idle worker; collect results and progress; fail on the first error."""
    from multiprocessing.connection import wait

    results: list = [None] * len(specs)
    queue = list(range(len(specs)))[::-1]
    idle, running = list(range(len(procs)))[::-1], {}  # worker -> shard index
    while queue or running:
        while idle and queue:
            worker, index = idle.pop(), queue.pop()
            running[worker] = index
            try:
                conns[worker].send((index, specs[index]))
            except OSError:  # it died idle (or never started)
                procs[worker].join(STOP_SECONDS)
                raise worker_lost(labels[index], _exit_cause(procs[worker].exitcode)) from None
        ready = set(wait([conns[w] for w in running] + [procs[w].sentinel for w in running]))
        for worker in list(running):
            if conns[worker] not in ready and procs[worker].sentinel not in ready:
                continue
            dead = False
            while worker in running:
                try:
                    if not conns[worker].poll():
                        break
                    message = conns[worker].recv()
                except (EOFError, OSError):  # its end closed: the worker is gone
                    dead = True
                    break
                if message[0] == "advance":
                    meter.advance(message[1], message[2])
                    continue
                _tag, index, status, value, peak = message
                meter.worker_peak = max(meter.worker_peak, peak)
                if status != "ok":
                    raise task_failure(value, labels[index])
                results[index] = value
                meter.finished(index)
                del running[worker]
                idle.append(worker)
            if worker in running and (dead or procs[worker].sentinel in ready):
                procs[worker].join(STOP_SECONDS)
                raise worker_lost(labels[running[worker]], _exit_cause(procs[worker].exitcode))
    return results


def _exit_cause(exitcode: int | None) -> str:
    if exitcode is None:
        return "it closed its connection"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"it exited with status {exitcode}"
