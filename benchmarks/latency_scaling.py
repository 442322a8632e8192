"""Request latency and peak memory per parallel layout, over real HTTP through ./launch.sh.

    .venv/bin/python benchmarks/latency_scaling.py [--layouts 1,U2,R2,C2,U2C2,U4]
        [--config configs/bench-cpu.yaml] [--model PATH] [--size 256x256 --frames 17 --steps 8]

Per layout, one server (`./launch.sh --nproc N --ulysses U --ring R --cfg C`) on a free port;
--warmup then --repeats synchronous multipart POST /v1/videos with an image of exactly the
target size. Records the end-to-end median / min / max, per-stage medians from the response
`timings`, and peak memory per rank: VmHWM of each rank process (its lifetime high-water
mark, loading included) and, where the driver sees CUDA, the most `nvidia-smi` reported per
process while the requests ran. Layouts run one after the other. Writes JSON and a PNG
(median latency vs ranks; speedup T(1)/T(N) vs N against the ideal line).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_bench_model import model_flags  # noqa: E402
from parallel_efficiency import Layout, parse_layout  # noqa: E402
from serving_overhead import bench_server, input_png, timed_posts  # noqa: E402
from conftest import rank_pids  # noqa: E402  (on the path through serving_overhead)

REPO = Path(__file__).resolve().parent.parent
STAGES = ("text_encode", "image_encode", "denoise", "step_mean", "vae_decode", "mp4_encode")
PROMPT = "a lighthouse in a storm"
MIB = 1 << 20


def vm_hwm_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(ln.split()[1]) / 1024 for ln in status if ln.startswith("VmHWM:")), None)


class GpuMemoryPoller:
    """Max `used_memory` (MiB) per pid from nvidia-smi, sampled every `period` seconds."""

    def __init__(self, period: float = 0.5) -> None:
        self.period, self.peak, self._stop = period, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True)
            for line in out.stdout.splitlines():
                pid, _, used = (part.strip() for part in line.partition(","))
                if pid.isdigit() and used.isdigit():
                    self.peak[int(pid)] = max(self.peak.get(int(pid), 0.0), float(used))
            self._stop.wait(self.period)

    def __enter__(self) -> GpuMemoryPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cuda_in_driver() -> bool:
    try:
        import torch
        return torch.cuda.is_available() and shutil.which("nvidia-smi") is not None
    except ImportError:
        return False


def run_layout(layout: Layout, args: argparse.Namespace, flags: list[str], png: bytes,
               gpu: bool, log_dir: Path) -> dict:
    form = {"prompt": PROMPT, "size": args.size, "num_frames": str(args.frames),
            "num_inference_steps": str(args.steps), "seed": str(args.seed)}
    poller = GpuMemoryPoller() if gpu else None
    log_path = log_dir / f"latency_scaling.{layout.name}.log"
    with bench_server(log_path, *layout.flags(), "--config", str(args.config), *flags,
                      nproc=layout.nproc, env={"OMP_NUM_THREADS": str(args.omp_threads)}) as server:
        ranks = rank_pids(server.proc.pid)
        with poller or contextlib.nullcontext():
            runs = timed_posts(server.url, form, png, args.warmup, args.repeats, layout.name)
        memory = {str(rank): {"pid": pid, "vm_hwm_mib": vm_hwm_mib(pid)}
                  for rank, pid in sorted(ranks.items())}
    if poller is not None:
        for entry in memory.values():
            entry["gpu_peak_mib"] = poller.peak.get(entry["pid"])
    e2e = [r["e2e"] for r in runs]
    return {"layout": layout.name, "nproc": layout.nproc, "ulysses": layout.ulysses,
            "ring": layout.ring, "cfg": layout.cfg, "e2e_median": statistics.median(e2e),
            "e2e_min": min(e2e), "e2e_max": max(e2e),
            "stages": {k: statistics.median(r[k] for r in runs) for k in STAGES
                       if all(k in r for r in runs)},
            "memory": memory,  # nvidia-smi pids may be in another namespace: keep them all
            "gpu_peak_mib_by_pid": dict(poller.peak) if poller else None,
            "runs": runs}


def add_speedups(rows: list[dict]) -> None:
    base = next((r["e2e_median"] for r in rows if r["nproc"] == 1), None)
    for r in rows:
        r["speedup"] = base / r["e2e_median"] if base else None


def peak(row: dict, key: str) -> float | None:
    values = [m[key] for m in row["memory"].values() if m.get(key) is not None]
    if not values and key == "gpu_peak_mib" and row["gpu_peak_mib_by_pid"]:
        values = list(row["gpu_peak_mib_by_pid"].values())  # pids seen from another namespace
    return max(values) if values else None


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    ns = sorted({r["nproc"] for r in rows})
    for i, r in enumerate(rows):
        # layouts sharing a rank count (U2, R2, C2) are spread a little so none hides another
        same = [o["layout"] for o in rows if o["nproc"] == r["nproc"]]
        x = r["nproc"] + 0.12 * (same.index(r["layout"]) - (len(same) - 1) / 2)
        err = [[r["e2e_median"] - r["e2e_min"]], [r["e2e_max"] - r["e2e_median"]]]
        ax_t.errorbar(x, r["e2e_median"], yerr=err, fmt="o", capsize=4, color=f"C{i % 10}",
                      label=r["layout"])
        if r["speedup"] is not None:
            ax_s.plot(x, r["speedup"], "o", color=f"C{i % 10}")
    if any(r["speedup"] is not None for r in rows):
        ax_s.plot([1, max(ns)], [1, max(ns)], "k--", lw=1, label="ideal")
    else:
        ax_s.text(0.5, 0.5, "no 1-rank layout: no baseline", ha="center", transform=ax_s.transAxes)
    fig.legend(title="layout", loc="center right")
    ax_t.set(xlabel="ranks (N)", ylabel="median end-to-end latency (s)",
             title="latency per request (bars: min-max)")
    ax_s.set(xlabel="ranks (N)", ylabel="speedup T(1) / T(N)", title="speedup vs ranks")
    for ax in (ax_t, ax_s):
        ax.set_xticks(ns)
        ax.set_xlim(0.5, max(ns) + 0.5)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)  # room for the labels above the top point
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict]) -> None:
    fmt = lambda v, p=".3f": "-" if v is None else format(v, p)  # noqa: E731
    print(f"\n{'layout':<8}{'N':>3}{'median s':>10}{'min':>9}{'max':>9}{'speedup':>9}"
          f"{'denoise':>9}{'step':>8}{'vae dec':>9}{'VmHWM MiB':>11}{'GPU MiB':>9}")
    for r in rows:
        s = r["stages"]
        print(f"{r['layout']:<8}{r['nproc']:>3}{r['e2e_median']:>10.3f}{r['e2e_min']:>9.3f}"
              f"{r['e2e_max']:>9.3f}{fmt(r['speedup'], '.2f'):>9}{fmt(s.get('denoise')):>9}"
              f"{fmt(s.get('step_mean')):>8}{fmt(s.get('vae_decode')):>9}"
              f"{fmt(peak(r, 'vm_hwm_mib'), '.0f'):>11}{fmt(peak(r, 'gpu_peak_mib'), '.0f'):>9}")
    print("memory columns: the largest rank's peak (VmHWM: process lifetime, loading included)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="1,U2,R2,C2")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "bench-cpu.yaml")
    p.add_argument("--model", help="default: the preset's (bench model if it names none)")
    p.add_argument("--size", default="256x256", help="WxH, multiples of 16")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--omp-threads", type=int, default=1,
                   help="OMP_NUM_THREADS per rank, the same for every layout")
    p.add_argument("--out", type=Path, default=Path("bench-out/latency_scaling.json"))
    p.add_argument("--plot", type=Path, default=Path("bench-out/latency_scaling.png"))
    args = p.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    args.config = args.config.resolve()
    width, height = (int(v) for v in args.size.lower().split("x"))
    layouts = [parse_layout(t) for t in args.layouts.split(",") if t.strip()]
    flags = model_flags(args.config, args.model)
    gpu = cuda_in_driver()
    cores = os.cpu_count() or 1
    if not gpu and max(lo.nproc for lo in layouts) * args.omp_threads > cores:
        print(f"warning: {cores} cores for up to {max(lo.nproc for lo in layouts)} ranks x "
              f"{args.omp_threads} thread(s); oversubscribed layouts cannot scale")
    for path in (args.out, args.plot):
        path.parent.mkdir(parents=True, exist_ok=True)
    png = input_png(width, height, 0)
    desc = (f"{' '.join([args.config.name, *flags])}; {args.size} x {args.frames} frames, "
            f"{args.steps} steps, seed {args.seed}; {args.warmup} warm-up + {args.repeats} runs; "
            f"{'CUDA' if gpu else 'CPU'}")
    print(desc)
    rows = []
    for layout in layouts:
        print(f"{layout.name} ({layout.nproc} rank(s))...", flush=True)
        rows.append(run_layout(layout, args, flags, png, gpu, args.out.parent.resolve()))
    add_speedups(rows)
    report(rows)
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"params": params, "model_flags": flags, "cuda": gpu,
                                    "cores": cores, "layouts": rows}, indent=1))
    plot(rows, args.plot, desc)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
