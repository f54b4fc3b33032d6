#!/usr/bin/env python
"""Signal stress test for qfinal's writing commands: SIGINT/SIGTERM at a random moment.

Each trial starts one `qfinal save|dequantize|diff --html` as a subprocess, sends SIGTERM or SIGINT
after a delay drawn uniformly over the command's measured lifetime (or, with --mode after-tmp,
just after its temporary folder/file appears beside the target), and records: the exit code, the
time from the signal to the exit, and what was left beside the target (the output itself and any
`.OUT.qfinal-tmp-*` folder or `.FILE.*.tmp` file). A process that has not exited `--timeout`
seconds after the signal is a hang: its threads are dumped (py-spy when available, then SIGABRT,
which Python's faulthandler turns into a traceback of every thread) and it is killed.

The requirement checked: a signal at any moment exits within --limit seconds (5) with code 130
and leaves nothing. A signal that lands after the output was published (the command already done
or committing) may instead end with the command's normal code and a complete output ("late"):
counted apart, not as a failure.

    python stress_signals.py --trials 300                       # all commands, both signals
    python stress_signals.py --trials 100 --commands save --signals TERM --mode after-tmp
    python stress_signals.py --qfinal "/path/python -m qfinal" --jobs 2 --json results.json

Self-contained: the fixtures (a tiny Llama, its bnb nf4 copy, a perturbed copy for diff) are
built in --workdir by a child process of the same interpreter (needs torch, transformers,
bitsandbytes). Everything it writes stays under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

QFINAL = [sys.executable, "-m", "qfinal"]
SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT}
COMMANDS = ("save", "dequantize", "diff")

BUILD_FIXTURES = r"""
import json, shutil, sys
from pathlib import Path
import torch, transformers as tf
from safetensors.torch import load_file, save_file

root = Path(sys.argv[1])
plain, nf4, other = root / "llama", root / "llama-nf4", root / "llama-perturbed"
torch.manual_seed(1234)
cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=False)
tf.LlamaForCausalLM(cfg).eval().save_pretrained(plain)
quantized = tf.LlamaForCausalLM.from_pretrained(
    plain, quantization_config=tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
quantized.save_pretrained(nf4)
shutil.copytree(plain, other)
state = load_file(other / "model.safetensors")
key = "model.layers.1.mlp.down_proj.weight"
state[key] = state[key].clone()
state[key][3, 5] += 0.5
save_file(state, other / "model.safetensors", metadata={"format": "pt"})
(root / "done").write_text("ok")
"""


# ----------------------------------------------------------------------------- commands


def command_spec(command: str, fixtures: Path, trial_dir: Path) -> tuple[list[str], Path, set[int]]:
    """(qfinal arguments, the target path, exit codes of an uninterrupted run)."""
    if command == "save":
        out = trial_dir / "out"
        return ["save", str(fixtures / "llama"), str(out), "--max-shard-size", "100KB", "--quiet"], out, {0}
    if command == "dequantize":
        out = trial_dir / "out"
        return ["dequantize", str(fixtures / "llama-nf4"), str(out), "--max-shard-size", "40KB", "--quiet"], out, {0}
    if command == "diff":
        out = trial_dir / "report.html"
        return (
            ["diff", str(fixtures / "llama"), str(fixtures / "llama-perturbed"), "--html", str(out), "--quiet"],
            out,
            {1},
        )
    raise ValueError(command)


def leftovers(trial_dir: Path, target: Path) -> list[str]:
    """Everything beside the target (its parent is the trial's own folder), the target included."""
    return sorted(p.name for p in trial_dir.iterdir() if p.name not in ("stdout", "stderr", "py-spy"))


def temp_beside(trial_dir: Path, target: Path) -> bool:
    return any(name.startswith(f".{target.name}.") for name in os.listdir(trial_dir))


# ----------------------------------------------------------------------------- one trial


@dataclass
class Trial:
    index: int
    command: str
    signal: str
    mode: str  # uniform | after-tmp
    delay: float  # planned seconds after start (uniform mode) or after the temp appeared
    rc: int | None = None
    outcome: str = ""  # interrupted | late | early-exit | FAIL-*
    exit_after_signal: float | None = None
    signalled: bool = False
    temp_at_signal: bool = False  # a temp beside the target existed when the signal was sent
    left: list[str] = field(default_factory=list)
    traceback: bool = False
    stderr_tail: str = ""
    dump: str = ""  # py-spy / faulthandler dump of a hang


def dump_hung(proc: subprocess.Popen, trial_dir: Path, py_spy: str | None) -> str:
    parts = []
    if py_spy:
        try:
            done = subprocess.run([py_spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=20)
            parts.append("py-spy:\n" + done.stdout + done.stderr)
        except (OSError, subprocess.TimeoutExpired) as err:
            parts.append(f"py-spy failed: {err}")
    try:
        proc.send_signal(signal.SIGABRT)  # faulthandler (PYTHONFAULTHANDLER=1) prints every thread
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "\n".join(parts)


def run_trial(t: Trial, args, fixtures: Path, lifetime: dict[str, float]) -> Trial:
    trial_dir = Path(args.workdir) / "trials" / f"{t.index:05d}-{t.command}-{t.signal}"
    shutil.rmtree(trial_dir, ignore_errors=True)
    trial_dir.mkdir(parents=True)
    argv, target, normal_codes = command_spec(t.command, fixtures, trial_dir)
    env = dict(
        os.environ,
        PYTHONFAULTHANDLER="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        QFINAL_CACHE=str(Path(args.workdir) / "qfinal-cache"),
    )
    env.pop("QFINAL_DEBUG", None)
    with open(trial_dir / "stdout", "wb") as out, open(trial_dir / "stderr", "wb") as err:
        # Default dispositions in the child (a harness started in the background may ignore SIGINT).
        proc = subprocess.Popen(
            args.qfinal + argv,
            stdout=out,
            stderr=err,
            env=env,
            cwd=trial_dir,
            start_new_session=True,
            preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in SIGNALS.values()],
        )
        try:
            if t.mode == "uniform":
                deadline = time.monotonic() + t.delay
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
            else:  # after-tmp: the moment the temporary folder/file appears, plus t.delay
                give_up = time.monotonic() + 4 * lifetime[t.command] + 30
                while proc.poll() is None and not temp_beside(trial_dir, target) and time.monotonic() < give_up:
                    time.sleep(0.0005)
                deadline = time.monotonic() + t.delay
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.0005)
            if proc.poll() is None:
                t.temp_at_signal = temp_beside(trial_dir, target)
                proc.send_signal(SIGNALS[t.signal])
                sent = time.monotonic()
                t.signalled = True
                try:
                    proc.wait(timeout=args.timeout)
                    t.exit_after_signal = time.monotonic() - sent
                except subprocess.TimeoutExpired:
                    t.exit_after_signal = None
                    t.dump = dump_hung(proc, trial_dir, args.py_spy)
            else:
                proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    t.rc = proc.returncode
    stderr = (trial_dir / "stderr").read_text(errors="replace")
    t.traceback = "Traceback" in stderr and not t.dump
    t.stderr_tail = stderr[-3000:] if (t.dump or t.traceback) else stderr[-300:]
    t.left = leftovers(trial_dir, target)
    temps = [n for n in t.left if n.startswith(f".{target.name}.")]
    complete = target.exists() and not temps
    if t.signalled and t.exit_after_signal is None:
        t.outcome = "FAIL-hang"
    elif not t.signalled:
        t.outcome = "early-exit" if (t.rc in normal_codes and complete) else "FAIL-unsignalled"
    elif t.rc == 130 and not t.left and not t.traceback:
        t.outcome = "FAIL-slow" if t.exit_after_signal > args.limit else "interrupted"
    elif t.rc in normal_codes and complete and t.exit_after_signal <= args.limit:
        t.outcome = "late"  # the output was published before the signal: a normal end
    elif t.rc != 130:
        t.outcome = f"FAIL-rc{t.rc}"
    elif t.left:
        t.outcome = "FAIL-leftover"
    else:
        t.outcome = "FAIL-traceback"
    if t.outcome in ("interrupted", "late", "early-exit") and not args.keep:
        shutil.rmtree(trial_dir, ignore_errors=True)
    return t


# ----------------------------------------------------------------------------- setup


def build_fixtures(workdir: Path) -> Path:
    fixtures = workdir / "fixtures"
    if (fixtures / "done").is_file():
        return fixtures
    shutil.rmtree(fixtures, ignore_errors=True)
    fixtures.mkdir(parents=True)
    print(f"building fixtures in {fixtures} ...", flush=True)
    subprocess.run(
        [sys.executable, "-c", BUILD_FIXTURES, str(fixtures)],
        check=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return fixtures


def calibrate(args, fixtures: Path, commands: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Median lifetime of each command, uninterrupted, at the trial concurrency (--jobs), and the
    median time its temporary folder/file exists beside the target (the writing window)."""
    lifetime, window = {}, {}
    for command in commands:
        times, windows = [], []

        def once(i: int) -> tuple[float, float]:
            trial_dir = Path(args.workdir) / "calibrate" / f"{command}-{i}"
            shutil.rmtree(trial_dir, ignore_errors=True)
            trial_dir.mkdir(parents=True)
            argv, target, codes = command_spec(command, fixtures, trial_dir)
            start = time.monotonic()
            proc = subprocess.Popen(
                args.qfinal + argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=trial_dir,
                env=dict(os.environ, HF_HUB_OFFLINE="1", QFINAL_CACHE=str(Path(args.workdir) / "qfinal-cache")),
            )
            first = last = None
            err = b""
            chunks = []
            reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
            reader.start()
            while proc.poll() is None:
                if temp_beside(trial_dir, target):
                    now = time.monotonic()
                    first = first or now
                    last = now
                time.sleep(0.001)
            took = time.monotonic() - start
            reader.join()
            err = b"".join(chunks).decode(errors="replace")
            if proc.returncode not in codes or not target.exists():
                raise SystemExit(f"calibration: {command} exited {proc.returncode}:\n{err[-3000:]}")
            shutil.rmtree(trial_dir, ignore_errors=True)
            return took, (last - first + 0.002) if first else 0.002

        with ThreadPoolExecutor(args.jobs) as pool:
            for _ in range(args.calibration_runs):
                for took, win in pool.map(once, range(args.jobs)):
                    times.append(took)
                    windows.append(win)
        lifetime[command] = statistics.median(times)
        window[command] = statistics.median(windows)
        print(
            f"calibrate: {command}: lifetime median {lifetime[command]:.2f}s "
            f"(min {min(times):.2f}, max {max(times):.2f}, n={len(times)}); temp beside the target for "
            f"{window[command]:.3f}s (median)",
            flush=True,
        )
    return lifetime, window


def summarize(trials: list[Trial], args, wall: float) -> dict:
    def stats(ts):
        exits = [t.exit_after_signal for t in ts if t.exit_after_signal is not None]
        return {
            "trials": len(ts),
            "signalled": sum(t.signalled for t in ts),
            "outcomes": dict(sorted(Counter(t.outcome for t in ts).items())),
            "exit_codes": dict(sorted(Counter(str(t.rc) for t in ts if t.signalled).items())),
            "slowest_exit_after_signal_s": round(max(exits), 3) if exits else None,
            "median_exit_after_signal_s": round(statistics.median(exits), 3) if exits else None,
            "with_leftovers": sum(bool(t.left) and t.outcome not in ("late", "early-exit") for t in ts),
        }

    groups = {"all": trials}
    for m in sorted({t.mode for t in trials}):
        groups[f"mode={m}"] = [t for t in trials if t.mode == m]
    for c in sorted({t.command for t in trials}):
        for s in sorted({t.signal for t in trials}):
            groups[f"{c}/SIG{s}"] = [t for t in trials if t.command == c and t.signal == s]
    return {"wall_s": round(wall, 1), "mode": args.mode, "summary": {k: stats(v) for k, v in groups.items() if v}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=300, help="number of trials in all (default 300)")
    p.add_argument("--commands", default=",".join(COMMANDS), help="comma list of save,dequantize,diff")
    p.add_argument("--signals", default="TERM,INT", help="comma list of TERM,INT")
    p.add_argument(
        "--mode",
        choices=("mixed", "uniform", "after-tmp"),
        default="mixed",
        help="uniform: delay ~ U(0, lifetime*--span) from the start; after-tmp: U(0, window) after "
        "the temporary folder/file appears beside the target, window = 1.2 x the time it "
        "existed in calibration (or --after-tmp-window); mixed (default): alternate the two",
    )
    p.add_argument("--span", type=float, default=1.0, help="uniform mode: fraction of the lifetime covered")
    p.add_argument("--after-tmp-window", type=float, default=None, help="after-tmp mode: seconds")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds after the signal before a hang is declared")
    p.add_argument("--limit", type=float, default=5.0, help="the required exit time after a signal")
    p.add_argument("--jobs", type=int, default=1, help="trials run at once (the machine's cores bound it)")
    p.add_argument("--calibration-runs", type=int, default=2, help="uninterrupted runs per command and job")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workdir", default=None, help="default: ./stress-out")
    p.add_argument("--qfinal", default=None, help="the qfinal invocation (default: sys.executable -m qfinal)")
    p.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy binary for hang dumps")
    p.add_argument("--json", default=None, help="write every trial and the summary to this file")
    p.add_argument("--keep", action="store_true", help="keep the folders of passing trials too")
    args = p.parse_args(argv)
    args.qfinal = shlex.split(args.qfinal) if args.qfinal else list(QFINAL)
    args.workdir = str(Path(args.workdir or "stress-out").resolve())
    commands = [c for c in args.commands.split(",") if c]
    signals = [s.removeprefix("SIG") for s in args.signals.split(",") if s]
    assert set(commands) <= set(COMMANDS) and set(signals) <= set(SIGNALS), (commands, signals)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fixtures = build_fixtures(workdir)
    lifetime, window = calibrate(args, fixtures, commands)
    plan = []
    for i in range(args.trials):
        command, sig = commands[i % len(commands)], signals[(i // len(commands)) % len(signals)]
        mode = (
            args.mode if args.mode != "mixed" else ("uniform", "after-tmp")[(i // (len(commands) * len(signals))) % 2]
        )
        if mode == "uniform":
            delay = rng.uniform(0.0, lifetime[command] * args.span)
        else:
            delay = rng.uniform(
                0.0, args.after_tmp_window if args.after_tmp_window is not None else window[command] * 1.2
            )
        plan.append(Trial(i, command, sig, mode, round(delay, 4)))
    print(
        f"{len(plan)} trials, seed {seed}, mode {args.mode}, jobs {args.jobs}, qfinal {shlex.join(args.qfinal)}",
        flush=True,
    )
    trials: list[Trial] = []
    lock = threading.Lock()
    start = time.monotonic()

    def one(t: Trial) -> Trial:
        done = run_trial(t, args, fixtures, lifetime)
        with lock:
            trials.append(done)
            bad = done.outcome.startswith("FAIL")
            if bad or len(trials) % 25 == 0:
                took = "-" if done.exit_after_signal is None else f"{done.exit_after_signal:.2f}s"
                print(
                    f"[{len(trials)}/{len(plan)}] #{done.index} {done.command} SIG{done.signal} {done.mode} "
                    f"delay {done.delay:.3f}s -> {done.outcome} rc={done.rc} exit {took} "
                    f"temp@signal={done.temp_at_signal} left={done.left}",
                    flush=True,
                )
                if bad:
                    print("    " + (done.dump or done.stderr_tail).strip().replace("\n", "\n    ")[-4000:], flush=True)
        return done

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, plan))
    result = summarize(sorted(trials, key=lambda t: t.index), args, time.monotonic() - start)
    result.update(
        seed=seed,
        lifetime_s={k: round(v, 3) for k, v in lifetime.items()},
        temp_window_s={k: round(v, 3) for k, v in window.items()},
        qfinal=args.qfinal,
    )
    for name, row in result["summary"].items():
        print(
            f"{name:20s} n={row['trials']:4d} signalled={row['signalled']:4d} outcomes={row['outcomes']} "
            f"rc={row['exit_codes']} slowest={row['slowest_exit_after_signal_s']}s "
            f"median={row['median_exit_after_signal_s']}s leftovers={row['with_leftovers']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "trials": [asdict(t) for t in trials]}, indent=1))
    failed = sum(t.outcome.startswith("FAIL") for t in trials)
    print(f"{failed} failing trial(s) of {len(trials)} in {result['wall_s']}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
