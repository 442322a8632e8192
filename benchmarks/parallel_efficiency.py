"""Parallel efficiency of the engine's layouts on the transformer-bound CPU preset.

    .venv/bin/python benchmarks/parallel_efficiency.py [--layouts 1,U2,R2,C2] [--repeat 3]

Per layout, one `torchrun --nproc-per-node N -m wanserve.engine.serving.offline` with OMP_NUM_THREADS=1 (one
thread per rank) runs the same request --repeat times; the first run is a warm-up. That is
done --rounds times, the layouts taking turns within each round, so a drift of the machine's
speed touches every layout alike. Reports the median whole-request `wall`, the median of each
stage, and efficiency T(1) / (N * T(N)) for each. Any other flag (e.g. --set
defaults.num_frames=5) goes to wanserve.engine.serving.offline. Goal: efficiency >= 0.90 (printed as PASS/MISS,
not asserted).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_bench_model import model_flags  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = REPO / ".venv" / "bin" / "torchrun"
GOAL = 0.90


@dataclass(frozen=True)
class Layout:
    name: str
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    @property
    def nproc(self) -> int:
        return self.ulysses * self.ring * self.cfg

    def flags(self) -> list[str]:
        return ["--ulysses", str(self.ulysses), "--ring", str(self.ring), "--cfg", str(self.cfg)]


def parse_layout(text: str) -> Layout:
    """'1' (one rank) or degrees like 'U2', 'R2', 'C2', 'U2C2', 'U2R2C2'."""
    text = text.strip().upper()
    if text == "1":
        return Layout("1")
    if not re.fullmatch(r"(?:[URC]\d+)+", text):
        raise SystemExit(f"bad layout {text!r}: use 1 or e.g. U2, R2, C2, U2C2")
    degrees = {"U": 1, "R": 1, "C": 1}
    for axis, n in re.findall(r"([URC])(\d+)", text):
        degrees[axis] = int(n)
    return Layout(text, ulysses=degrees["U"], ring=degrees["R"], cfg=degrees["C"])


def run_layout(layout: Layout, args: argparse.Namespace, passthrough: list[str],
               tmp: Path) -> list[dict]:
    out = tmp / f"out-{layout.name}.npz"
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(layout.nproc),
           "-m", "wanserve.engine.serving.offline", "--requests", str(tmp / "reqs.json"), "--out", str(out),
           "--repeat", str(args.repeat), "--config", str(args.config), *layout.flags(),
           *passthrough]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{layout.name}: wanserve.engine.serving.offline failed ({proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    runs = json.loads(Path(f"{out}.json").read_text())["runs"]
    return [run for run in runs if run["round"] >= 1]  # round 0 is the warm-up


STAGES = ("wall", "image_encode", "denoise", "vae_decode")


def summarise(layout: Layout, runs: list[dict], base: dict | None) -> dict:
    row = {"layout": layout.name, "nproc": layout.nproc, "runs": runs,
           "step_mean_median": statistics.median(r["step_mean"] for r in runs)}
    for stage in STAGES:
        row[f"{stage}_median"] = statistics.median(r[stage] for r in runs)
        row[f"eff_{stage}"] = (base[f"{stage}_median"] / (layout.nproc * row[f"{stage}_median"])
                               if base else None)
    return row


def report(rows: list[dict]) -> None:
    def cell(value: float | None, pattern: str) -> str:
        return "-" if value is None else format(value, pattern)

    def verdict(value: float | None) -> str:
        return "" if value is None else (" PASS" if value >= GOAL else " MISS")

    print(f"\n{'layout':<8}{'N':>3}{'request (s)':>12}{'encode (s)':>11}{'denoise (s)':>12}"
          f"{'decode (s)':>11}{'step (s)':>9}  {'efficiency: request':>24}{'encode':>8}"
          f"{'denoise':>8}{'decode':>8}")
    for r in rows:
        whole = cell(r["eff_wall"], ".3f") + (verdict(r["eff_wall"]) if r["nproc"] > 1 else "")
        parts = "".join(f"{cell(r[f'eff_{s}'], '.3f'):>8}" for s in STAGES[1:])
        print(f"{r['layout']:<8}{r['nproc']:>3}{r['wall_median']:>12.3f}"
              f"{r['image_encode_median']:>11.3f}{r['denoise_median']:>12.3f}"
              f"{r['vae_decode_median']:>11.3f}{r['step_mean_median']:>9.3f}  {whole:>24}{parts}")
    print(f"goal: efficiency T(1)/(N*T(N)) >= {GOAL:.2f} for the whole request "
          "(PASS/MISS per layout, not asserted); stage efficiencies say where the time goes")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="1,U2,R2,C2")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs per layout and round; the first is a warm-up")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; every layout runs once per round, in turn")
    p.add_argument("--size", default="256x256", help="WxH, multiples of 16")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "bench-cpu.yaml")
    p.add_argument("--model", help="default: the preset's (bench model if it names none)")
    p.add_argument("--out", type=Path, default=Path("bench-out/parallel_efficiency.json"))
    args, passthrough = p.parse_known_args()
    if args.repeat < 2:
        raise SystemExit("--repeat must be >= 2: the first run is discarded")
    args.config = args.config.resolve()
    width, height = (int(v) for v in args.size.lower().split("x"))
    layouts = [parse_layout(t) for t in args.layouts.split(",") if t.strip()]
    flags = model_flags(args.config, args.model)
    cores = os.cpu_count() or 1
    if max(layout.nproc for layout in layouts) > cores:
        print(f"warning: {cores} cores but up to {max(lo.nproc for lo in layouts)} ranks; "
              "oversubscribed layouts cannot reach full efficiency")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{args.config.name} {flags} {passthrough}; {args.size}, seed {args.seed}, "
          f"{args.rounds} round(s) of {args.repeat - 1} measured run(s) after 1 warm-up per layout")
    measured: list[tuple[Layout, list[dict]]] = [(layout, []) for layout in layouts]
    with tempfile.TemporaryDirectory(prefix="wanserve-bench-") as tmp:
        spec = {"width": width, "height": height, "seed": args.seed}  # frames/steps: preset
        (Path(tmp) / "reqs.json").write_text(json.dumps([spec]))
        for round_ in range(1, args.rounds + 1):
            for layout, runs in measured:
                print(f"  round {round_}: {layout.name} ({layout.nproc} rank(s))...", flush=True)
                runs.extend(run_layout(layout, args, [*flags, *passthrough], Path(tmp)))
    one_rank = next((runs for layout, runs in measured if layout.nproc == 1), None)
    base = summarise(Layout("1"), one_rank, None) if one_rank else None
    rows = [summarise(layout, runs, base) for layout, runs in measured]
    report(rows)
    args.out.write_text(json.dumps({
        "config": str(args.config), "model_flags": flags, "passthrough": passthrough,
        "size": args.size, "seed": args.seed, "repeat": args.repeat, "rounds": args.rounds,
        "cores": cores,
        "omp_num_threads": 1, "goal_efficiency_min": GOAL, "layouts": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
