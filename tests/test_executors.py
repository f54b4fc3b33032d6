"""Per-shard work in this process, on a local process pool and on Ray: the same bytes whichever.

`qfinal dequantize` is the client: each output shard is one task. A task that raises, or whose
worker is killed or exits, fails the run with its shard named, and nothing is published. The
failing tasks are top-level functions of this module (a worker imports them by name); they wrap the
real `write_shard` and break on shard BROKEN, after writing part of its file. This module imports
little at its top: every pool worker imports it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

import qfinal.ops.dequantize as dq
from qfinal.errors import CheckpointError
from qfinal.ops.executors import Executor, TaskError, WorkerLost, make_executor, run_tasks

TESTS = Path(__file__).resolve().parent
BROKEN = 3  # the output shard the failing tasks break (its number in the file name)
WRITE_SHARD = dq.write_shard  # the real one: the tests replace it in this process


def _breaks(task) -> bool:
    if f"model-{BROKEN:05d}-of-" not in Path(task.path).name:
        return False
    Path(task.path).write_bytes(b"half a shard")  # a partial file in the temporary folder
    return True


def raising_write_shard(task):
    if _breaks(task):
        raise RuntimeError("disk on fire")
    return WRITE_SHARD(task)


def refusing_write_shard(task):
    if _breaks(task):
        raise CheckpointError("the absmax is unreadable", where="src: model.layers.0.mlp.up_proj.weight")
    return WRITE_SHARD(task)


def killed_write_shard(task):
    if _breaks(task):
        os.kill(os.getpid(), signal.SIGKILL)
    return WRITE_SHARD(task)


def exiting_write_shard(task):
    if _breaks(task):
        os._exit(3)
    return WRITE_SHARD(task)


def square_after(spec):
    """(n, seconds): sleeps, so that later shards finish first on a pool; reports one unit."""
    from qfinal.ops.executors import advance

    n, seconds = spec
    time.sleep(seconds)
    advance()
    return n * n


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source(checkpoints, tmp_path_factory) -> Path:
    """An untied llama nf4 + double quant checkpoint in 30 KB shards: a weight's quant state may sit
    in another file than its packed data, so each task reads from several files."""
    import builders

    root = tmp_path_factory.mktemp("executors")
    return builders.bnb_checkpoint(checkpoints["llama_untied"], root / "src", "nf4_dq", max_shard_size="30KB")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> dict[str, bytes]:
    """OUT written in this process, in 20 KB shards."""
    out = tmp_path_factory.mktemp("reference") / "out"
    dq.dequantize_checkpoint(source, out, max_shard_size="20KB")
    files = snapshot(out)
    assert sum(name.endswith(".safetensors") for name in files) > BROKEN + 1
    return files


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray the test starts (2 CPUs; no token written to the home folder), joined as a
    cluster the user started would be; its workers import this module from tests/."""
    ray = pytest.importorskip("ray")
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        job_config=ray.job_config.JobConfig(code_search_path=[str(TESTS)]),
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = before


def dequantize(source, out, executor, progress=None, stats=None):
    return dq.dequantize_checkpoint(
        source, out, max_shard_size="20KB", executor=executor, progress=progress, stats=stats
    )


# ----------------------------------------------------------------------------------------- the same bytes


def test_pool_writes_the_same_bytes(source, reference, tmp_path):
    out, calls = tmp_path / "out", []
    result = dequantize(source, out, Executor("pool", 2), progress=lambda done, total: calls.append((done, total)))
    assert snapshot(out) == reference
    assert result.files == sorted(reference)
    total = len(result.dequantized) + len(result.cast)
    assert [c[0] for c in calls] == list(range(1, total + 1)) and {c[1] for c in calls} == {total}


def test_ray_without_a_cluster_is_one_line(source, tmp_path, capsys, monkeypatch):
    """qfinal joins an existing cluster and never starts one: none running -> exit 2, one line."""
    import builders

    ray = pytest.importorskip("ray")
    if ray.is_initialized() or Path("/tmp/ray/ray_current_cluster").exists():
        pytest.skip("a Ray cluster is running here")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, stdout, stderr = builders.run_cli(capsys, "dequantize", source, tmp_path / "out", "--executor", "ray")
    assert code == 2 and stdout == "" and len(stderr.splitlines()) == 1, stderr
    assert "cannot join a Ray cluster" in stderr and "ray start --head" in stderr
    assert_nothing_published(tmp_path)
    assert not ray.is_initialized()


def test_ray_writes_the_same_bytes(ray_cluster, source, reference, tmp_path):
    from qfinal.ops.executors import TaskStats

    out, calls, stats = tmp_path / "out", [], TaskStats()
    result = dequantize(source, out, Executor("ray"), lambda done, total: calls.append((done, total)), stats)
    assert snapshot(out) == reference
    assert stats.worker_peak_bytes > 100 * 2**20  # Ray's workers reported their own peak
    total = len(result.dequantized) + len(result.cast)
    done = [c[0] for c in calls]
    assert done == sorted(done) and done[-1] == total and {c[1] for c in calls} == {total}


def test_cli_workers_writes_the_same_bytes(source, reference, tmp_path, capsys):
    import builders

    out = tmp_path / "out"
    code, report = builders.run_json(capsys, "dequantize", source, out, "--max-shard-size", "20KB", "--workers", "2")
    assert code == 0 and report["ok"]
    executor = report["extra"]["dequantize"]["executor"]
    assert {k: executor[k] for k in ("kind", "workers")} == {"kind": "pool", "workers": 2}
    # the workers' own peak (they import torch: well above 100 MB), said in the stage
    assert executor["worker_peak_bytes"] > 100 * 2**20
    [stage] = [s for s in report["stages"] if s["name"] == "dequantize"]
    assert "each worker peaked at" in stage["detail"]
    assert snapshot(out) == reference


def test_quantize_on_a_pool_writes_the_same_bytes(checkpoints, tmp_path):
    """`qfinal quantize`'s shards are tasks too (its bit-identity with transformers is tested in
    test_quantize_stream.py); in-process and on a pool they are the same bytes."""
    from qfinal.ops.quantize import run_quantize

    src, written = checkpoints["llama_untied"], {}
    for name, executor in [("inprocess", None), ("pool", Executor("pool", 2))]:
        report = run_quantize(
            src, tmp_path / name, method="nf4", double_quant=True, max_shard_size="20KB", executor=executor
        )
        assert report.ok
        peak = report.extra["quantize"]["worker_peak_bytes"]
        assert (peak > 100 * 2**20) if executor else peak == 0  # in-process: the run's own peak is the stage's
        written[name] = snapshot(tmp_path / name)
    assert sum(name.endswith(".safetensors") for name in written["pool"]) > 2
    assert written["pool"] == written["inprocess"]


def test_results_come_back_in_shard_order(tmp_path):
    specs = [(n, 0.4 if n == 0 else 0.0) for n in range(5)]  # shard 0 finishes last
    calls = []
    got = run_tasks(
        square_after,
        specs,
        Executor("pool", 2),
        labels=[f"s{n}" for n in range(5)],
        units=[2] * 5,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert got == [0, 1, 4, 9, 16]
    assert calls[-1] == (10, 10) and [c[0] for c in calls] == sorted(c[0] for c in calls)


# ----------------------------------------------------------------------------------------- failures


def shard_name(files: dict[str, bytes]) -> str:
    count = sum(name.endswith(".safetensors") for name in files)
    return f"model-{BROKEN:05d}-of-{count:05d}.safetensors"


def assert_nothing_published(tmp_path: Path) -> None:
    assert list(tmp_path.iterdir()) == []  # no OUT, no .out.qfinal-tmp-* folder


@pytest.mark.parametrize("kind", ["inprocess", "pool"])
def test_a_raising_task_fails_the_run_naming_its_shard(source, reference, tmp_path, monkeypatch, kind):
    monkeypatch.setattr(dq, "write_shard", raising_write_shard)
    with pytest.raises(TaskError, match="disk on fire") as failed:
        dequantize(source, tmp_path / "out", Executor(kind, 2 if kind == "pool" else None))
    assert str(failed.value).startswith(f"{shard_name(reference)}: RuntimeError: disk on fire")
    assert "raising_write_shard" in "".join(getattr(failed.value, "__notes__", [])) or kind == "inprocess"
    assert_nothing_published(tmp_path)


def test_a_refusal_in_a_worker_keeps_its_class_and_place(source, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(dq, "write_shard", refusing_write_shard)
    with pytest.raises(CheckpointError) as failed:
        dequantize(source, tmp_path / "out", Executor("pool", 2))
    assert failed.value.where == "src: model.layers.0.mlp.up_proj.weight"
    assert failed.value.what == f"the absmax is unreadable (writing {shard_name(reference)})"
    assert_nothing_published(tmp_path)


@pytest.mark.parametrize("how, cause", [(killed_write_shard, "killed by SIGKILL"), (exiting_write_shard, "status 3")])
def test_a_dead_pool_worker_fails_the_run_naming_its_shard(source, reference, tmp_path, monkeypatch, how, cause):
    monkeypatch.setattr(dq, "write_shard", how)
    with pytest.raises(WorkerLost) as failed:
        dequantize(source, tmp_path / "out", Executor("pool", 2))
    assert failed.value.where == shard_name(reference)
    assert cause in failed.value.what and "nothing was written" in failed.value.what
    assert_nothing_published(tmp_path)


@pytest.mark.parametrize("how", [raising_write_shard, exiting_write_shard], ids=["raises", "exits"])
def test_ray_failures_name_the_shard(ray_cluster, source, reference, tmp_path, monkeypatch, how):
    monkeypatch.setattr(dq, "write_shard", how)
    expected = TaskError if how is raising_write_shard else WorkerLost
    with pytest.raises(expected) as failed:
        dequantize(source, tmp_path / "out", Executor("ray"))
    assert shard_name(reference) in str(failed.value)
    assert_nothing_published(tmp_path)


# ----------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "command", [["dequantize"], ["quantize"], ["merge", "--adapter", "missing-adapter"]], ids=lambda c: c[0]
)
def test_ray_missing_is_one_line(source, tmp_path, capsys, monkeypatch, command):
    """Every command with --executor refuses it the same way, before reading anything."""
    import builders

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    name, *rest = command
    code, stdout, stderr = builders.run_cli(capsys, name, source, tmp_path / "out", *rest, "--executor", "ray")
    assert code == 2 and stdout == "" and len(stderr.splitlines()) == 1, stderr
    assert "Ray is not installed" in stderr and "qfinal[ray]" in stderr and "Traceback" not in stderr
    assert_nothing_published(tmp_path)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--workers", "0"], "at least 1 worker"),
        (["--address", "ray://head:10001"], "--executor ray"),
        (["--executor", "inprocess", "--workers", "2"], "one shard at a time"),
        (["--executor", "dask"], "unknown executor"),
    ],
)
def test_bad_executor_options_are_one_line(source, tmp_path, capsys, argv, words):
    import builders

    code, stdout, stderr = builders.run_cli(capsys, "dequantize", source, tmp_path / "out", *argv)
    assert code == 2 and len(stderr.splitlines()) == 1 and words in stderr, stderr
    assert_nothing_published(tmp_path)


def test_make_executor_defaults():
    assert make_executor() == Executor("inprocess")
    assert make_executor(workers=3) == Executor("pool", 3)
    assert make_executor("ray", address="10.0.0.1:6379") == Executor("ray", None, "10.0.0.1:6379")
    assert make_executor("pool").workers >= 1
