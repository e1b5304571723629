"""Run every benchmark with small settings and write ``results.json`` + ``summary.md`` to ``--out``.

Each benchmark is a separate ``python benchmarks/<name>.py ...`` process printing JSON; a failing one is recorded
with its error and the rest still run. Defaults use the tiny registry models (``test_dinov2``/``test_mae``, 32 px)
so the whole run stays under ~10 minutes on 2 shared CPU cores; ``--full`` uses the settings of the targets in
docs/performance.md (ViT-S/14 at 112/56 px, ViT-B/16 MAE at 224 px: hours on 2 cores, minutes on a GPU box).

Run: ``python benchmarks/run_all.py --out bench_out [--full] [--only pretrain_fp32 ...]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SMALL = {
    "matmul_peak": ["matmul_peak.py", "--budget-s", "4"],
    "pretrain_fp32": ["pretrain_step.py", "--model", "test_dinov2", "--global-size", "32", "--local-size", "16",
                      "--n-local", "4", "--batch-size", "8", "--prototypes", "1024", "--precision", "fp32",
                      "--steps", "3", "--rounds", "2", "--peak-size", "512", "--threads", "1"],
    "pretrain_bf16": ["pretrain_step.py", "--model", "test_dinov2", "--global-size", "32", "--local-size", "16",
                      "--n-local", "4", "--batch-size", "8", "--prototypes", "1024", "--precision", "bf16",
                      "--steps", "2", "--rounds", "2", "--peak-size", "512", "--threads", "1"],
    "pretrain_mae_bf16": ["pretrain_step.py", "--objective", "mae", "--model", "test_mae", "--global-size", "32",
                          "--batch-size", "8", "--precision", "bf16", "--steps", "1", "--rounds", "1",
                          "--peak-size", "512", "--threads", "1"],
    "finetune_fp32": ["finetune_step.py", "--model", "test_dinov2", "--img-size", "32", "--batch-size", "16",
                      "--steps", "3", "--rounds", "2", "--peak-size", "512", "--threads", "1"],
    "features_fp32": ["features.py", "--model", "test_dinov2", "--img-size", "32", "--n-images", "256"],
    "multicrop": ["multicrop.py", "--batch", "4", "--repeats", "3", "--size", "128", "--global-size", "112",
                  "--local-size", "56", "--n-local", "4"],
}

FULL = {
    "matmul_peak": ["matmul_peak.py"],
    "pretrain_fp32": ["pretrain_step.py", "--precision", "fp32"],
    "pretrain_bf16": ["pretrain_step.py", "--precision", "bf16"],
    "pretrain_mae_bf16": ["pretrain_step.py", "--objective", "mae", "--precision", "bf16"],
    "finetune_fp32": ["finetune_step.py"],
    "features_fp32": ["features.py"],
    "multicrop": ["multicrop.py"],
}


def run_one(cmd: list[str], timeout: float) -> dict:
    """Run one benchmark script; its last stdout JSON object, or an error record."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-2000:], "wall_s": wall}
    text = proc.stdout
    try:
        result = json.loads(text[text.index("{"):])
    except ValueError:
        return {"error": f"no JSON in output: {text[-500:]}", "wall_s": wall}
    result["wall_s"] = wall
    return result


def _fmt(x) -> str:
    return "—" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def summary_markdown(results: dict[str, dict], commands: dict[str, list[str]]) -> str:
    """One table row per benchmark: ours vs baseline time, ratios, memory, achieved GFLOP/s."""
    lines = ["# explora benchmarks", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
    peak = results.get("matmul_peak", {}).get("gflops", {})
    if peak:
        lines += [f"Matmul peak (GFLOP/s): {', '.join(f'{k} {v}' for k, v in peak.items())}", ""]
    lines += ["| benchmark | ours s/step | baseline s/step | speed-up | ours img/s | peak RSS ours/base (MiB) "
              "| RSS ratio | step memory ratio | ours GFLOP/s | fraction of peak |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'].splitlines()[-1][:80] if r['error'] else ''} ||||||||| ")
            continue
        o, b, c = r.get("ours", {}), r.get("baseline", {}), r.get("comparison", {})
        if name == "matmul_peak":
            continue
        if name == "multicrop":
            lines.append(f"| multicrop | — | — | {_fmt(r.get('speedup', r.get('ratio')))} | "
                         f"{_fmt(r.get('ours', {}).get('images_per_s') if isinstance(r.get('ours'), dict) else None)}"
                         " | — | — | — | — | — |")
            continue
        lines.append(f"| {name} | {_fmt(o.get('s_per_step'))} | {_fmt(b.get('s_per_step'))} | "
                     f"{_fmt(c.get('speedup'))} | {_fmt(o.get('images_per_s'))} | "
                     f"{_fmt(o.get('peak_rss_mib'))} / {_fmt(b.get('peak_rss_mib'))} | {_fmt(c.get('peak_rss_ratio'))}"
                     f" | {_fmt(c.get('step_memory_ratio'))} | {_fmt(o.get('achieved_gflops'))} | "
                     f"{_fmt(o.get('fraction_of_matmul_peak'))} |")
    targets = [(name, t, v) for name, r in results.items() for t, v in (r.get("targets") or {}).items()
               if isinstance(v, dict)]
    if targets:
        lines += ["", "## Targets", "", "| benchmark | target | measured | met | shortfall | why (if missed) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {t} {v['target']} | {_fmt(v['measured'])} | {_fmt(v['met'])} | "
                  f"{_fmt(v.get('shortfall'))} | {v.get('why', '')} |" for name, t, v in targets]
    lines += ["", "Commands (from the repository root):", ""]
    lines += [f"- {name}: `python benchmarks/{' '.join(cmd)}`" for name, cmd in commands.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory (results.json, summary.md)")
    ap.add_argument("--full", action="store_true", help="the target settings (slow on a CPU)")
    ap.add_argument("--only", nargs="+", help="run only these benchmarks")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per benchmark")
    args = ap.parse_args(argv)
    commands = FULL if args.full else SMALL
    if args.only:
        unknown = set(args.only) - set(commands)
        if unknown:
            ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(commands)}")
        commands = {k: v for k, v in commands.items() if k in args.only}
    if "multicrop" in commands and not (HERE / "multicrop.py").is_file():
        commands = {k: v for k, v in commands.items() if k != "multicrop"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, cmd in commands.items():
        print(f"[run_all] {name}: python benchmarks/{' '.join(cmd)}", file=sys.stderr, flush=True)
        results[name] = run_one(cmd, args.timeout)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(summary_markdown(results, commands))
    print((out / "summary.md").read_text())
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
