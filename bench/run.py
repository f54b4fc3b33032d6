"""qfinal vs plain transformers: wall time and peak RSS, command by command (`make bench`).

    python bench/run.py [--quick] [--repeats N] [--short-repeats N] [--only load_bf16,help,...] [--out bench/out]

1. Builds (or reuses) the checkpoints under bench/out/ (git-ignored), each in its own process:
   a TinyLlama-shaped 1.1B bf16 checkpoint in 500 MB shards (random weights, fixed seed), its nf4
   version (transformers quantize-on-load + save_pretrained), and a 70B-shaped sparse checkpoint
   (bench/validate_fast_70b.py's writer). `--quick` uses a ~0.2B shape and one repeat.
2. Runs each qfinal command and its plain transformers equivalent as separate child processes,
   `--repeats` times (`--short-repeats` for the lines of a few seconds), alternating which side
   goes first. Wall time is measured around the child;
   peak RSS is the child's own `ru_maxrss` from `os.wait4` (that child alone; the orchestrator
   never imports torch, so nothing of it leaks into a child's figure).
3. Prints a table of medians and qfinal/transformers ratios, checks the targets (PASS/MISS), and
   writes the same as JSON (bench/out/results.json, or results-quick.json with --quick).

Before every run the orchestrator calls sync() (untimed), so no run pays for the previous one's
unwritten output. The figures are only as quiet as the machine: on a shared 2-core box, expect a few percent of
run-to-run noise in the times (the JSON keeps every run). Peak RSS is stable, except for
quantize-on-load, where glibc's heap retention makes it vary by up to ~1 GB on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import checkpoints  # noqa: E402  (no torch at import time)

GB = 10**9
CHILD_TIMEOUT_S = 900


# --------------------------------------------------------------------------- what runs


@dataclass
class Target:
    what: str  # "time" / "rss" (ratios), "abs_time" (seconds) / "abs_rss" (bytes), qfinal side
    limit: float

    def label(self) -> str:
        if self.what == "abs_time":
            return f"time < {self.limit:g} s"
        if self.what == "abs_rss":
            return f"RSS < {self.limit / GB:g} GB"
        return f"{self.what} <= {self.limit:.3g}"


@dataclass
class Line:
    key: str
    title: str
    qfinal: list[str]
    transformers: list[str] | None = None
    targets: list[Target] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)  # removed before every run (not timed) and at the end
    inputs: list[Path] = field(default_factory=list)  # read into the page cache before every run (not timed)
    short: bool = False  # a few seconds a run: runs --short-repeats times, its median is that noisy


def qfinal_cli() -> list[str]:
    """The console script users run, as installed next to this interpreter."""
    script = Path(sys.executable).parent / "qfinal"
    return [str(script)] if script.exists() else [sys.executable, "-m", "qfinal"]


def build_lines(ck: dict[str, Path], work: Path) -> list[Line]:
    py, tasks, cli = sys.executable, str(HERE / "tasks.py"), qfinal_cli()
    bf16, nf4, sparse = str(ck["bf16"]), str(ck["nf4"]), str(ck["sparse70b"])
    deq_q, deq_t, save_q, save_t = (
        work / n for n in ("dequantize-qfinal", "dequantize-transformers", "save-qfinal", "save-transformers")
    )
    fp8, ct = str(ck["fp8"]), str(ck["ct_w4a16"])
    return [
        Line(
            "load_bf16",
            "load bf16 + forward",
            [py, tasks, "qfinal-load-forward", bf16],
            [py, tasks, "transformers-load-forward", bf16],
            [Target("time", 1.05), Target("rss", 1.0)],
            inputs=[ck["bf16"]],
            short=True,
        ),
        Line(
            "load_nf4",
            "load nf4 (quantize on load)",
            cli + ["load", bf16, "--quantize", "nf4", "--quiet"],
            [py, tasks, "transformers-load-quantized", bf16, "nf4"],
            [Target("time", 0.5), Target("rss", 0.4)],
            inputs=[ck["bf16"]],
        ),
        Line(
            "load_int8",
            "load int8 (quantize on load)",
            cli + ["load", bf16, "--quantize", "int8", "--quiet"],
            [py, tasks, "transformers-load-quantized", bf16, "int8"],
            inputs=[ck["bf16"]],
        ),
        Line(
            "dequantize_nf4",
            "dequantize nf4 -> fp16",
            cli + ["dequantize", nf4, str(deq_q), "--dtype", "float16", "--quiet"],
            [py, tasks, "transformers-dequantize", nf4, "float16"],
            [Target("time", 1.0), Target("rss", 1 / 3)],
            scratch=[deq_q, deq_t],
            inputs=[ck["nf4"]],
        ),
        Line(
            "dequantize_fp8",
            "dequantize fp8 block -> bf16",
            cli + ["dequantize", fp8, str(deq_q), "--dtype", "bfloat16", "--quiet"],
            [py, tasks, "transformers-load-save", fp8, str(deq_t), "bfloat16"],
            [Target("time", 0.8), Target("rss", 0.25)],
            scratch=[deq_q, deq_t],
            inputs=[ck["fp8"]],
        ),
        Line(
            "dequantize_ct_w4a16",
            "dequantize compressed-tensors W4A16 -> bf16",
            cli + ["dequantize", ct, str(deq_q), "--dtype", "bfloat16", "--quiet"],
            [py, tasks, "ct-decompress-save", ct, str(deq_t), "bfloat16"],
            [Target("time", 0.8), Target("rss", 0.25)],
            scratch=[deq_q, deq_t],
            inputs=[ck["ct_w4a16"]],
        ),
        Line(
            "merge_lora",
            "merge LoRA r=16 (all linear) vs peft merge_and_unload + save",
            cli + ["merge", bf16, str(save_q), "--adapter", str(ck["lora"]), "--quiet"],
            [py, tasks, "peft-merge-save", bf16, str(ck["lora"]), str(save_t)],
            [Target("time", 0.6), Target("rss", 0.3)],
            scratch=[save_q, save_t],
            inputs=[ck["bf16"], ck["lora"]],
        ),
        Line(
            "quantize_nf4",
            "quantize nf4 (streamed) vs load + save_pretrained",
            cli + ["quantize", bf16, str(deq_q), "--quantize", "nf4", "--quiet"],
            [py, tasks, "transformers-quantize-save", bf16, str(deq_t), "nf4"],
            [Target("time", 0.4), Target("abs_rss", 1.0 * GB)],
            scratch=[deq_q, deq_t],
            inputs=[ck["bf16"]],
        ),
        Line(
            "save_round_trip",
            "save round trip (bf16)",
            cli + ["save", bf16, str(save_q), "--quiet"],
            [py, tasks, "transformers-save-round-trip", bf16, str(save_t), "2GB"],
            [Target("time", 1.3)],
            scratch=[save_q, save_t],
            inputs=[ck["bf16"]],
            short=True,
        ),
        Line(
            "validate_fast_70b",
            "validate --fast (70B sparse)",
            cli + ["validate", sparse, "--fast", "--quiet"],
            targets=[Target("abs_time", 10.0), Target("abs_rss", 1.0 * GB)],
        ),  # headers only: no warm-up
        Line("help", "qfinal --help", cli + ["--help"], targets=[Target("abs_time", 0.5)]),
        *flat_lines(ck, cli, deq_q, deq_t, save_q, save_t),
    ]


def flat_lines(ck: dict[str, Path], cli: list[str], deq_q, deq_t, save_q, save_t) -> list[Line]:
    """Peak RSS flat in model size: qfinal on the Llama-7B-shaped checkpoint against qfinal on the
    1.1B (the "transformers" column holds the 1.1B run). Only with the 7B checkpoints built by hand
    (bench/README.md); `--only quantize_flat,merge_flat` runs them."""
    if "bf16_7b" not in ck:
        return []
    bf16, bf16_7b, lora, lora_7b = (str(ck[k]) for k in ("bf16", "bf16_7b", "lora", "lora_7b"))
    return [
        Line(
            "quantize_flat",
            "quantize nf4: 7B-shaped vs 1.1B, both qfinal",
            cli + ["quantize", bf16_7b, str(deq_q), "--quantize", "nf4", "--quiet"],
            cli + ["quantize", bf16, str(deq_t), "--quantize", "nf4", "--quiet"],
            [Target("rss", 1.10)],
            scratch=[deq_q, deq_t],
        ),
        Line(
            "merge_flat",
            "merge LoRA r=16: 7B-shaped vs 1.1B, both qfinal",
            cli + ["merge", bf16_7b, str(save_q), "--adapter", lora_7b, "--quiet"],
            cli + ["merge", bf16, str(save_t), "--adapter", lora, "--quiet"],
            [Target("rss", 1.10)],
            scratch=[save_q, save_t],
        ),
    ]


# --------------------------------------------------------------------------- measuring


def child_env() -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TQDM_DISABLE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONWARNINGS="ignore",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def measure(argv: list[str], timeout: float = CHILD_TIMEOUT_S) -> dict:
    """Run one child; wall seconds around it, its own peak RSS (bytes), exit code, output tail."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(), cwd=str(ROOT)
        )
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        out.seek(0)
        tail = out.read()[-4000:].decode(errors="replace")
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return {
        "wall_s": round(wall, 4),
        "peak_rss_bytes": peak,
        "exit_code": proc.returncode,
        "timed_out": wall > timeout,
        "output_tail": tail if proc.returncode else tail[-300:],
    }


def clear(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def settle(inputs: list[Path]) -> None:
    """Untimed, before every run: flush dirty pages, so that a run never pays (through its fsync, or
    writeback throttling) for the gigabytes the previous run left to write; then read the line's
    input checkpoints, so that every run finds them in the page cache, as this script's docs say.
    The VMs here evict page cache while 20 GB are free (the 1.1B checkpoint lost 2 % of its
    resident pages in 3 idle minutes), and the first run of a line is always qfinal's: in one
    5-run bench that began after an idle quarter of an hour, the first load bf16 run took 9.0 s
    against 5.0-5.8 s for the other four."""
    if hasattr(os, "sync"):
        os.sync()
    buffer = bytearray(8 << 20)
    for folder in inputs:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(buffer):
                    pass


def run_line(line: Line, repeats: int, log) -> dict:
    sides = {"qfinal": line.qfinal}
    if line.transformers:
        sides["transformers"] = line.transformers
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(repeats):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            clear(line.scratch)
            settle(line.inputs)
            result = measure(sides[side])
            runs[side].append(result)
            status = "ok" if result["exit_code"] == 0 else f"EXIT {result['exit_code']}"
            log(
                f"    {line.key:<18} run {r + 1}/{repeats} {side:<12} {result['wall_s']:8.2f} s  "
                f"{result['peak_rss_bytes'] / GB:6.2f} GB  {status}"
            )
            if result["exit_code"] != 0:
                log("      " + result["output_tail"].strip().replace("\n", "\n      ")[-1500:])
    clear(line.scratch)
    summary: dict = {
        "title": line.title,
        "commands": {s: " ".join(map(_short, a)) for s, a in sides.items()},
        "runs": runs,
    }
    for side, rs in runs.items():
        good = [x for x in rs if x["exit_code"] == 0]
        summary[side] = (
            {
                "wall_s": statistics.median(x["wall_s"] for x in good),
                "wall_s_range": [min(x["wall_s"] for x in good), max(x["wall_s"] for x in good)],
                "peak_rss_bytes": int(statistics.median(x["peak_rss_bytes"] for x in good)),
                "ok_runs": len(good),
                "runs": len(rs),
            }
            if good
            else None
        )
    q, t = summary.get("qfinal"), summary.get("transformers")
    if q and t:
        summary["ratio"] = {"time": q["wall_s"] / t["wall_s"], "rss": q["peak_rss_bytes"] / t["peak_rss_bytes"]}
    summary["targets"] = [judge(target, summary) for target in line.targets]
    return summary


def judge(target: Target, summary: dict) -> dict:
    q = summary.get("qfinal")
    if target.what == "abs_time":
        value = q["wall_s"] if q else None
    elif target.what == "abs_rss":
        value = q["peak_rss_bytes"] if q else None
    else:
        value = summary.get("ratio", {}).get(target.what)
    if value is None:
        verdict = "MISS"
    elif target.what in ("abs_time", "abs_rss"):
        verdict = "PASS" if value < target.limit else "MISS"
    else:
        verdict = "PASS" if value <= target.limit else "MISS"
    return {"target": target.label(), "what": target.what, "limit": target.limit, "value": value, "verdict": verdict}


def _short(arg: str) -> str:
    for base, name in ((str(ROOT) + os.sep, ""), (sys.executable, "python")):
        if arg.startswith(base):
            return name + arg[len(base) :] if name else arg[len(base) :]
    return arg


# --------------------------------------------------------------------------- checkpoints


def ensure_checkpoints(out: Path, quick: bool, log) -> dict[str, Path]:
    shape = "quick-0.2b" if quick else "tinyllama-1.1b"
    prefix = "quick" if quick else "llama"
    folders = {
        "bf16": out / f"{prefix}-bf16",
        "nf4": out / f"{prefix}-nf4",
        "fp8": out / f"{prefix}-fp8",
        "ct_w4a16": out / f"{prefix}-ct-w4a16",
        "lora": out / f"{prefix}-lora",
        "sparse70b": out / "sparse-70b",
    }
    builds = [
        ("bf16", ["--shape", shape]),
        ("nf4", ["--shape", shape, "--source", str(folders["bf16"])]),
        ("fp8", ["--shape", shape, "--source", str(folders["bf16"])]),
        ("ct_w4a16", ["--shape", shape, "--source", str(folders["bf16"])]),
        ("lora", ["--shape", shape, "--source", str(folders["bf16"])]),
        ("sparse70b", []),
    ]
    for kind, extra in builds:
        folder = folders[kind]
        if checkpoints.is_complete(folder, checkpoints.spec_for(kind, shape)):
            log(f"  reuse {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}")
            continue
        log(f"  build {kind} -> {folder}")
        result = measure([sys.executable, str(HERE / "checkpoints.py"), kind, str(folder), *extra], timeout=1800)
        if result["exit_code"] != 0:
            raise SystemExit(f"building {kind} failed:\n{result['output_tail']}")
        log(f"    {result['output_tail'].strip().splitlines()[-1]} (peak {result['peak_rss_bytes'] / GB:.2f} GB)")
    if not quick:  # the 7B geometry, built by hand (13 GB): the flat-memory lines run when it is there
        big = {"bf16_7b": out / "llama7b-bf16", "lora_7b": out / "llama7b-lora"}
        if all(checkpoints.is_complete(big[k], checkpoints.spec_for(k[:-3], "llama-7b")) for k in big):
            log(f"  reuse {big['bf16_7b']}, {big['lora_7b']}")
            folders.update(big)
    return folders


# --------------------------------------------------------------------------- report


def machine() -> dict:
    info: dict = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
        with open("/proc/meminfo") as fh:
            info["mem_total_gb"] = round(
                int(next(ln for ln in fh if ln.startswith("MemTotal")).split()[1]) * 1024 / GB, 1
            )
        info["loadavg_start"] = os.getloadavg()
    except (OSError, StopIteration):
        pass
    for pkg in ("qfinal", "torch", "transformers", "bitsandbytes", "safetensors"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    return info


def fmt_s(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def fmt_gb(x) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _value(target: dict) -> str:
    return f"{target['value'] / GB:.2f} GB" if target["what"] == "abs_rss" else f"{target['value']:.2f}"


def table(results: dict) -> str:
    head = (
        f"{'line':<30} {'qfinal s':>9} {'tf s':>8} {'t ratio':>7}   {'qfinal GB':>9} {'tf GB':>7} "
        f"{'RSS ratio':>9}   targets"
    )
    rows = [head, "-" * len(head)]
    for line in results["lines"].values():
        q, t, ratio = line.get("qfinal"), line.get("transformers"), line.get("ratio", {})
        targets = ", ".join(
            f"{x['target']} {x['verdict']}" + (f" ({_value(x)})" if x["value"] is not None else "")
            for x in line["targets"]
        )
        rows.append(
            f"{line['title']:<30} {fmt_s(q and q['wall_s']):>9} {fmt_s(t and t['wall_s']):>8} "
            f"{fmt_ratio(ratio.get('time')):>7}   {fmt_gb(q and q['peak_rss_bytes']):>9} "
            f"{fmt_gb(t and t['peak_rss_bytes']):>7} {fmt_ratio(ratio.get('rss')):>9}   {targets}"
        )
    return "\n".join(rows)


def spread(results: dict) -> str:
    """Each side's fastest and slowest run: a ratio inside the other side's spread is noise here."""
    rows = []
    for line in results["lines"].values():
        sides = [(name, line.get(name)) for name in ("qfinal", "transformers")]
        parts = [
            f"{name} {fmt_s(s['wall_s_range'][0])}-{fmt_s(s['wall_s_range'][1])} s"
            for name, s in sides
            if s and s["runs"] > 1
        ]
        if parts:
            rows.append(f"  {line['title']:<30} " + ", ".join(parts))
    return "\n".join(["run-to-run spread of wall time (fastest-slowest run):", *rows]) if rows else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~0.2B model and 1 repeat, for development")
    parser.add_argument("--repeats", type=int, help="runs per side (default 5, or 1 with --quick)")
    parser.add_argument(
        "--short-repeats",
        type=int,
        help="runs per side of the lines of a few seconds, load bf16 and save (default 9, "
        "or --repeats when that is given or with --quick)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated line keys: " + "load_bf16,load_nf4,load_int8,"
        "dequantize_nf4,save_round_trip,validate_fast_70b,help (quantize_flat,merge_flat need the 7B checkpoints)",
    )
    parser.add_argument("--out", default=str(HERE / "out"), help="checkpoints, scratch and results (default bench/out)")
    parser.add_argument("--json", help="results file (default OUT/results.json, OUT/results-quick.json with --quick)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    short_repeats = args.short_repeats or (repeats if args.repeats or args.quick else 9)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out / ("results-quick.json" if args.quick else "results.json")

    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    info = machine()
    log(
        f"machine: {info.get('nproc')} CPU(s), {info.get('mem_total_gb')} GB, {info.get('cpu')}; "
        f"torch {info['torch']}, transformers {info['transformers']}, bitsandbytes {info['bitsandbytes']}"
    )
    log("checkpoints:")
    ck = ensure_checkpoints(out, args.quick, log)
    lines = build_lines(ck, out / "work")
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {ln.key for ln in lines}
        if unknown:
            parser.error(f"unknown line(s): {', '.join(sorted(unknown))}")
        lines = [ln for ln in lines if ln.key in wanted]
    results: dict = {
        "machine": info,
        "quick": args.quick,
        "repeats": repeats,
        "short_repeats": short_repeats,
        "model": checkpoints.spec_for("bf16", "quick-0.2b" if args.quick else "tinyllama-1.1b"),
        "checkpoints": {k: str(v) for k, v in ck.items()},
        "lines": {},
    }
    log(f"running {len(lines)} line(s), {repeats} run(s) per side ({short_repeats} for the short ones), alternating:")
    for line in lines:
        results["lines"][line.key] = run_line(line, short_repeats if line.short else repeats, log)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["total_s"] = round(time.perf_counter() - start, 1)

    text = table(results)
    verdicts = [t for ln in results["lines"].values() for t in ln["targets"]]
    passed = sum(t["verdict"] == "PASS" for t in verdicts)
    print()
    print(
        f"qfinal vs transformers: medians of {repeats} run(s) per side ({short_repeats} for load bf16 and save); "
        "ratio = qfinal / transformers; "
        f"GB = 10^9 bytes of peak RSS"
    )
    print(text)
    if spread(results):
        print("\n" + spread(results))
    print(
        f"\ntargets: {passed}/{len(verdicts)} PASS; total {results['total_s']:.0f} s; "
        f"load average {info.get('loadavg_start', (float('nan'),))[0]:.2f} -> "
        f"{results['machine']['loadavg_end'][0]:.2f}"
    )
    results["table"] = text
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {json_path}")
    failed = [
        k
        for k, ln in results["lines"].items()
        for s in ("qfinal", "transformers")
        if s in ln["runs"] and any(r["exit_code"] != 0 for r in ln["runs"][s])
    ]
    if failed:
        print(f"some runs failed: {', '.join(sorted(set(failed)))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
