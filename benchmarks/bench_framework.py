"""gradflow against PyTorch (CPU) and the NumPy-based autograd libraries.

Each contender runs in its own worker process, because NumPy's and
PyTorch's BLAS slow each other down when both run threads in one process.
The driver interleaves rounds: round r asks every worker in turn for one
timing, so drift in the machine's speed hits all contenders alike. Every
figure is the median of the rounds after a warm-up, with BLAS, OpenMP and
Numba threads pinned to the same count everywhere.

Run all workloads:        python benchmarks/bench_framework.py
One workload, quicker:    python benchmarks/bench_framework.py --only chain --rounds 7
Write benchmarks/RESULTS.md's section as well:  --write-results
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import contenders  # noqa: E402 (from HERE)
from _results import write_section  # noqa: E402

WORKLOADS = {
    # name: (repetitions per timing, unit divisor, description). Both
    # graph-scaling sizes take one run per timing: back-to-back runs reuse
    # the memory and caches that the run before them freed, which made the
    # 10^4 figure about a tenth faster than one run on its own.
    "chain": (50, 100, "100-op chain on shape (4,), forward + backward, µs per op"),
    "chain_no_grad": (50, 100, "the same chain under no_grad, µs per op"),
    "broadcast": (200, 1, "a[64,1] + b[1,64], forward + backward, µs"),
    "scaling_1e4": (1, 1, "10^4 fan-out/fan-in steps, forward + backward, µs"),
    "scaling_1e5": (1, 1, "10^5 fan-out/fan-in steps, forward + backward, µs"),
    "mlp_gelu": (1, 1, "32 x (Linear(512,512) + GELU), batch 256: Adam step, µs"),
    "mlp_relu": (1, 1, "32 x (Linear(512,512) + ReLU), batch 256: Adam step, µs"),
}


# -- worker side ----------------------------------------------------------------

def _pin_threads(count):
    from threadpoolctl import threadpool_limits

    threadpool_limits(count)
    try:
        import numba

        numba.set_num_threads(count)
    except (ImportError, ValueError):
        pass
    try:
        import torch

        torch.set_num_threads(count)
    except ImportError:
        pass


def worker(name, threads):
    try:
        builders = contenders.CONTENDERS[name]()
    except ImportError as exc:
        print(json.dumps({"error": f"not installed: {exc}"}), flush=True)
        return
    except Exception as exc:  # a peer that installs but fails to import
        print(json.dumps({"error": f"failed to load: {type(exc).__name__}: {exc}"}),
              flush=True)
        return
    _pin_threads(threads)
    print(json.dumps({"ready": sorted(builders)}), flush=True)
    runs = {}
    for line in sys.stdin:
        workload, reps = line.split()
        if workload not in runs:
            runs[workload] = builders[workload]()
        run = runs[workload]
        start = time.perf_counter()
        for _ in range(int(reps)):
            run()
        elapsed = (time.perf_counter() - start) / int(reps)
        print(json.dumps({"seconds": elapsed, "phases": getattr(run, "phases", None)}),
              flush=True)


# -- driver side ------------------------------------------------------------------

class Worker:
    def __init__(self, name, threads):
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS"):
            env[var] = str(threads)
        env.update(contenders.CONTENDER_ENV.get(name, {}))
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", name, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        hello = json.loads(self.proc.stdout.readline())
        self.error = hello.get("error")
        self.workloads = set(hello.get("ready", ()))

    def time(self, workload, reps):
        self.proc.stdin.write(f"{workload} {reps}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def measure(workers, workload, rounds, settle=0.0):
    # ``settle``: seconds of idle time before each timing. OpenBLAS worker
    # threads busy-wait for a while after a matrix product, so a contender
    # timed right after another one's product shares the cores with them.
    reps = WORKLOADS[workload][0]
    taking_part = [w for w in workers if workload in w.workloads]
    for w in taking_part:  # warm-up: builds the workload, fills caches
        w.time(workload, reps)
    samples = {w.name: [] for w in taking_part}
    phases = {w.name: [] for w in taking_part}
    for _ in range(rounds):
        for w in taking_part:
            time.sleep(settle)
            reply = w.time(workload, reps)
            samples[w.name].append(reply["seconds"])
            if reply["phases"]:
                phases[w.name].append(reply["phases"])
    result = {}
    for name, values in samples.items():
        entry = {"median_s": statistics.median(values)}
        if phases[name]:
            entry["phases_s"] = [statistics.median(p) for p in zip(*phases[name])]
        result[name] = entry
    return result


def machine_description():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, {platform.system()}"


def versions():
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for package in ("gradflow", "numpy", "numba", "mkl", "torch", "autograd", "mygrad", "dezero"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = "not installed"
    return found


def format_table(results, names):
    lines = ["| workload | " + " | ".join(names) + " | gradflow / torch |",
             "| --- | " + " | ".join("---:" for _ in names) + " | ---: |"]
    for workload, by_name in results.items():
        divisor = WORKLOADS[workload][1]
        cells = []
        for name in names:
            entry = by_name.get(name)
            cells.append(f"{entry['median_s'] * 1e6 / divisor:,.2f}" if entry else "–")
        gf_entry, torch_entry = by_name.get("gradflow"), by_name.get("torch")
        ratio = (f"{gf_entry['median_s'] / torch_entry['median_s']:.2f}x"
                 if gf_entry and torch_entry else "–")
        lines.append(f"| {workload} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def derived_figures(results):
    notes = []

    for act in ("mlp_gelu", "mlp_relu"):
        by_name = results.get(act, {})
        floor, torch_entry = by_name.get("numpy"), by_name.get("torch")
        for name in ("gradflow", "gradflow-openblas"):
            gf_entry = by_name.get(name)
            if gf_entry and torch_entry and name != "gradflow":
                notes.append(f"- {act}: {name} / torch = "
                             f"{gf_entry['median_s'] / torch_entry['median_s']:.2f}x")
            if gf_entry and floor:
                notes.append(f"- {act}: {name} / bare-NumPy floor = "
                             f"{gf_entry['median_s'] / floor['median_s']:.2f}x")
            if gf_entry and "phases_s" in gf_entry:
                fwd, bwd, opt = gf_entry["phases_s"]
                notes.append(f"- {act}: {name} backward / forward = {bwd / fwd:.2f} "
                             f"(forward {fwd * 1e3:.1f} ms, backward {bwd * 1e3:.1f} ms, "
                             f"Adam {opt * 1e3:.1f} ms)")
        if torch_entry and "phases_s" in torch_entry:
            fwd, bwd, opt = torch_entry["phases_s"]
            notes.append(f"- {act}: torch backward / forward = {bwd / fwd:.2f}")
    small, large = results.get("scaling_1e4", {}), results.get("scaling_1e5", {})
    for name in small:
        if name in large:
            notes.append(f"- graph scaling, {name}: 10^5 / 10^4 time = "
                         f"{large[name]['median_s'] / small[name]['median_s']:.2f}x")

    return "\n".join(notes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for BLAS, OpenMP, Numba and torch (default 2)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="timed rounds per workload after the warm-up (default 7)")
    parser.add_argument("--only", nargs="*", choices=sorted(WORKLOADS),
                        help="run only these workloads")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="idle seconds before each timing, so that the "
                             "previous contender's BLAS threads stop spinning "
                             "(default 0.3)")
    parser.add_argument("--contenders", nargs="*",
                        default=["gradflow", "gradflow-openblas", "torch", "autograd",
                                 "mygrad", "dezero", "numpy"])
    parser.add_argument("--write-results", action="store_true",
                        help="replace this benchmark's section of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.threads)

    workers = [Worker(name, args.threads) for name in args.contenders]
    missing = {w.name: w.error for w in workers if w.error}
    live = [w for w in workers if not w.error]
    results = {}
    try:
        for workload in args.only or list(WORKLOADS):
            results[workload] = measure(live, workload, args.rounds, args.settle)
            print(f"{workload}: " + ", ".join(
                f"{n} {e['median_s'] * 1e6 / WORKLOADS[workload][1]:,.2f}"
                for n, e in results[workload].items()), flush=True)
    finally:
        for w in workers:
            w.close()
    names = [w.name for w in live]
    table = format_table(results, names)
    command = "python benchmarks/bench_framework.py " + " ".join(argv or sys.argv[1:])
    section = "\n".join([
        "## gradflow against PyTorch and the NumPy-based peers (CPU)",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine_description()}; threads pinned to {args.threads}",
        f"- date: {datetime.date.today().isoformat()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- median of {args.rounds} interleaved rounds after one warm-up round, "
        f"{args.settle} s idle before each timing",
        "",
        "Times in µs (per op for the chains). Lower is better.",
        "",
        table,
        "",
        derived_figures(results),
        "",
        "Not run: " + (", ".join(f"{k} ({v})" for k, v in missing.items()) or "none"),
    ])
    print()
    print(section)
    if args.write_results:
        write_section("bench_framework", section)


if __name__ == "__main__":
    main()
