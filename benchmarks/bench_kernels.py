"""Benchmarks of gradflow's Numba kernels: fused activation backward and clipping.

CPU, activation backward of 10^6 and 10^7 float32 elements: the fused loop
against the generic NumPy expression and against the bandwidth floor, a
Numba loop that reads two arrays and writes one (the same traffic as any
backward). Clipping, 2,000 gradients of 512 and 200 of 512x512 float32
elements: gradflow's multi-tensor path against its per-gradient loop,
against one dot product plus one scale over a single flat buffer (the
floor), and against torch.nn.utils.clip_grad_norm_ when PyTorch is
installed. With a usable GPU the same comparisons run on CUDA against CuPy,
plus the device's copy bandwidth and the host cost of one kernel launch.

Every figure is the median of interleaved rounds after a warm-up: round r
times each contender once, so drift in the machine's speed hits all alike.
NumPy/BLAS, Numba and PyTorch threads are pinned to ``--threads``.

    python benchmarks/bench_kernels.py                  # print the tables
    python benchmarks/bench_kernels.py --write-results  # and update RESULTS.md
    python benchmarks/bench_kernels.py --gpu-only       # the CUDA part only
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from _results import write_section

HERE = os.path.dirname(os.path.abspath(__file__))
ACTIVATION_SIZES = (10**6, 10**7)
CLIP_SHAPES = {"2000 x 512": [(512,)] * 2000, "200 x 512x512": [(512, 512)] * 200}
PARAMS = {"leaky_relu": (0.01, 0.0), "softplus": (1.0, 20.0)}
GENERIC_PARAMS = {
    "leaky_relu": {"negative_slope": 0.01},
    "softplus": {"beta": 1.0, "threshold": 20.0},
}


# -- timing -------------------------------------------------------------------


def median_times(candidates, rounds, repeats, clock=None):
    """Return {name: median seconds per call} over interleaved rounds."""
    clock = clock or _host_clock
    for run in candidates.values():
        run()
    samples = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            samples[name].append(clock(run, repeats))
    return {name: statistics.median(s) for name, s in samples.items()}


def _host_clock(run, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def pin_threads(count):
    from threadpoolctl import threadpool_limits

    import numba

    threadpool_limits(count)
    numba.set_num_threads(count)
    try:
        import torch

        torch.set_num_threads(count)
    except ImportError:
        pass


# -- activations ----------------------------------------------------------------


def activation_inputs(xp, name, size):
    """Return (saved, grad_output) float32 arrays as the forward would save them."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-4, 4, size).astype(np.float32)
    saved = {"relu": np.maximum(x, 0), "sigmoid": 1 / (1 + np.exp(-x)),
             "tanh": np.tanh(x)}.get(name, x)
    grad = rng.standard_normal(size).astype(np.float32)
    return xp.asarray(saved), xp.asarray(grad)


def generic_backward(xp, name):
    from gradflow._ops import _activation, _unary
    from gradflow.autograd._namespace import array_namespace

    function = getattr(_unary, f"_{name}_grad", None) or getattr(
        _activation, f"_{name}_grad"
    )
    namespace = array_namespace(xp)
    params = GENERIC_PARAMS.get(name, {})
    return lambda saved, grad: function(namespace, saved, grad, **params)


def bench_cpu_activations(rounds):
    from gradflow_kernels import ACTIVATIONS, _cpu

    rows = []
    for size in ACTIVATION_SIZES:
        for name in ACTIVATIONS:
            saved, grad = activation_inputs(np, name, size)
            a, b = PARAMS.get(name, (0.0, 0.0))
            generic = generic_backward(np, name)
            times = median_times({
                "fused": lambda: _cpu.activation_backward(name, saved, grad, a, b),
                "numpy": lambda: generic(saved, grad),
                "floor": lambda: _cpu_floor(saved, grad),
            }, rounds, repeats=3 if size > 10**6 else 10)
            rows.append((name, size, times))
    return rows


def _cpu_floor(saved, grad):
    from gradflow_kernels import _cpu

    out = np.empty_like(saved)
    _cpu.copy_sum_loop(saved, grad, out)
    return out


# -- clipping -------------------------------------------------------------------


class ShrinkingClip:
    """Call a clip function with a max_norm 10 % below the current norm.

    Clipping the same gradients again and again would stop changing them
    once their norm reached max_norm, and gradflow skips the scaling pass
    when the coefficient is 1, so each call requests a 10 % smaller norm.
    """

    def __init__(self, clip, params, norm):
        self.clip, self.params, self.target = clip, params, 0.9 * norm

    def __call__(self):
        self.clip(self.params, self.target)
        self.target *= 0.9


def clip_contenders(xp, shapes, device):
    import gradflow as gf
    from gradflow.nn.utils import clip_grad_norm_

    rng = np.random.default_rng(1)
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    norm = float(np.sqrt(sum(float(np.dot(h.ravel(), h.ravel())) for h in host)))

    def gradflow_params():
        # Clipping reads only .grad; the values are never read.
        params = [gf.empty(h.shape, device=device) for h in host]
        for p, h in zip(params, host):
            p.grad = gf.tensor(h, device=device)
        return params

    def buffered_params():
        params = gradflow_params()
        gf.nn.utils.GradientBuffer(params)
        return params

    loop = lambda ps, m: clip_grad_norm_(ps, m, foreach=False)  # noqa: E731
    contenders = {
        "gradflow": ShrinkingClip(clip_grad_norm_, gradflow_params(), norm),
        "gradflow, GradientBuffer": ShrinkingClip(clip_grad_norm_, buffered_params(), norm),
        "per-tensor loop": ShrinkingClip(loop, gradflow_params(), norm),
        "flat floor": _flat_floor(xp, host),
    }
    torch_clip = _torch_contender(host, norm) if xp is np else None
    if torch_clip is not None:
        contenders["torch"] = torch_clip
    return contenders


def _flat_floor(xp, host):
    flat = xp.asarray(np.concatenate([h.ravel() for h in host]))
    factors = [np.float32(0.5), np.float32(2.0)]

    def run():
        # One dot product and one scale; alternating 0.5 and 2 keeps the
        # values from drifting over many calls.
        total = xp.dot(flat, flat)
        xp.multiply(flat, factors[0], out=flat)
        factors.reverse()
        return total

    return run


def _torch_contender(host, norm):
    try:
        import torch
    except ImportError:
        return None
    params = [torch.zeros(h.shape) for h in host]
    for p, h in zip(params, host):
        p.grad = torch.from_numpy(h.copy())
    return ShrinkingClip(torch.nn.utils.clip_grad_norm_, params, norm)


def bench_clipping(rounds, xp=np, device="cpu", clock=None):
    rows = []
    for label, shapes in CLIP_SHAPES.items():
        contenders = clip_contenders(xp, shapes, device)
        times = median_times(contenders, rounds, repeats=3, clock=clock)
        rows.append((label, times))
    return rows


# -- GPU ------------------------------------------------------------------------


def gpu_usable():
    import gradflow as gf

    return gf.cuda.is_available()


def _device_clock(run, repeats):
    import cupy

    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeats):
        run()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / repeats


def bench_gpu(rounds):
    """Return the GPU results as a dict of tables, or None without a GPU."""
    if not gpu_usable():
        return None
    import cupy

    return {
        "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        "copy_gb_s": gpu_copy_bandwidth(rounds),
        "launch_us": gpu_launch_cost(rounds),
        "activations": bench_gpu_activations(rounds),
        "clipping": bench_clipping(rounds, cupy, "cuda", _device_clock),
        "large": bench_gpu_large(rounds),
    }


# The H200 targets: fused backward on 2**28 float32 elements, and clipping
# 10**9 float32 elements held in 2,000 gradients.
GPU_LARGE_ACTIVATION = 1 << 28
GPU_LARGE_CLIP = (2000, 500_000)


def bench_gpu_large(rounds):
    """Return {"activations": {name: TB/s}, "clip_ms": {contender: ms}}."""
    import cupy

    import gradflow as gf
    from gradflow.nn.utils import GradientBuffer, clip_grad_norm_
    from gradflow_kernels import _cuda

    result = {"activations": {}, "clip_ms": {}}
    x = cupy.random.uniform(-4, 4, GPU_LARGE_ACTIVATION, dtype=cupy.float32)
    grad = cupy.random.standard_normal(GPU_LARGE_ACTIVATION, dtype=cupy.float32)
    for name in ("relu", "gelu"):
        saved = cupy.maximum(x, 0) if name == "relu" else x
        seconds = median_times(
            {name: lambda: _cuda.activation_backward(name, saved, grad, 0.0, 0.0)},
            rounds, repeats=5, clock=_device_clock,
        )[name]
        # Two float32 reads and one write per element.
        result["activations"][name] = 12 * GPU_LARGE_ACTIVATION / seconds / 1e12
    count, size = GPU_LARGE_CLIP
    separate = [gf.empty(size, device="cuda") for _ in range(count)]
    for p in separate:
        p.grad = gf.tensor(cupy.random.standard_normal(size, dtype=cupy.float32))
    buffered = [gf.empty(size, device="cuda") for _ in range(count)]
    buffer = GradientBuffer(buffered)
    buffer.zero_()
    for p, q in zip(buffered, separate):
        p.grad.data[...] = q.grad.data
    norm = float(clip_grad_norm_(separate, float("inf")))
    times = median_times({
        "GradientBuffer": ShrinkingClip(clip_grad_norm_, buffered, norm),
        "separate gradients": ShrinkingClip(clip_grad_norm_, separate, norm),
    }, rounds, repeats=5, clock=_device_clock)
    result["clip_ms"] = {name: seconds * 1e3 for name, seconds in times.items()}
    return result


def gpu_copy_bandwidth(rounds):
    """Return device-to-device copy bandwidth in GB/s (bytes read + written)."""
    import cupy

    a = cupy.ones(1 << 28, dtype=cupy.uint8)
    b = cupy.empty_like(a)
    seconds = median_times({"copy": lambda: b.__setitem__(Ellipsis, a)}, rounds, 10,
                           _device_clock)["copy"]
    return 2 * a.nbytes / seconds / 1e9


def gpu_launch_cost(rounds):
    """Return host microseconds per launch on 1024 elements, two ways."""
    import cupy
    from gradflow_kernels import _cuda, _launch

    saved, grad = activation_inputs(cupy, "relu", 1024)
    out = cupy.empty_like(saved)
    kernel = _cuda.KERNELS["relu"]
    stream = _launch.current_stream()
    times = median_times({
        "gradflow": lambda: _cuda.activation_backward("relu", saved, grad),
        "numba default": lambda: kernel[4, 256, stream](saved, grad, out, 0.0, 0.0),
    }, rounds, repeats=200)
    cupy.cuda.get_current_stream().synchronize()
    return {name: seconds * 1e6 for name, seconds in times.items()}


def bench_gpu_activations(rounds):
    import cupy
    from gradflow_kernels import ACTIVATIONS, _cuda

    rows = []
    for size in ACTIVATION_SIZES:
        for name in ACTIVATIONS:
            saved, grad = activation_inputs(cupy, name, size)
            a, b = PARAMS.get(name, (0.0, 0.0))
            generic = generic_backward(cupy, name)
            times = median_times({
                "fused": lambda: _cuda.activation_backward(name, saved, grad, a, b),
                "cupy": lambda: generic(saved, grad),
            }, rounds, repeats=20, clock=_device_clock)
            rows.append((name, size, times))
    return rows


# -- report -----------------------------------------------------------------------


def format_activations(rows, baseline):
    lines = [
        f"| activation | elements | fused ms | {baseline} ms | {baseline} / fused "
        "| floor ms | fused / floor (GPU: fused GB/s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, size, t in rows:
        floor = t.get("floor")
        floor_ms = f"{floor * 1e3:.2f}" if floor else "-"
        if floor:
            ratio = f"{t['fused'] / floor:.2f}"
        else:
            # On the GPU: the fused kernel's own bandwidth, counting two
            # float32 reads and one write per element.
            ratio = f"{12 * size / t['fused'] / 1e9:.0f} GB/s"
        lines.append(
            f"| {name} | {size:.0e} | {t['fused'] * 1e3:.2f} | {t[baseline] * 1e3:.2f} "
            f"| {t[baseline] / t['fused']:.2f} | {floor_ms} | {ratio} |"
        )
    return lines


def format_clipping(rows):
    names = list(rows[0][1])
    lines = [
        "| gradients | " + " | ".join(f"{n} ms" for n in names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for label, t in rows:
        cells = " | ".join(f"{t[n] * 1e3:.3f}" for n in names)
        lines.append(f"| {label} | {cells} |")
    return lines


def check_targets(cpu_rows, clip_rows):
    """Return lines saying which CPU targets are met."""
    lines = []
    for name, size, t in cpu_rows:
        if name in ("relu", "sigmoid", "tanh"):
            ratio = t["fused"] / t["floor"]
            verdict = "met" if ratio <= 1.10 else "not met"
            lines.append(f"- {name} {size:.0e}: fused / floor = {ratio:.2f} "
                         f"(target <= 1.10): {verdict}")
        if name == "gelu":
            speedup = t["numpy"] / t["fused"]
            verdict = "met" if speedup >= 3 else "not met"
            lines.append(f"- gelu {size:.0e}: NumPy / fused = {speedup:.2f} "
                         f"(target >= 3): {verdict}")
    for label, t in clip_rows:
        if label == "2000 x 512" and "torch" in t:
            ratio = t["gradflow, GradientBuffer"] / t["torch"]
            verdict = "met" if ratio <= 0.05 else "not met"
            lines.append(
                f"- clipping {label}: gradflow with a GradientBuffer / torch = "
                f"{ratio:.3f} (target <= 0.05): {verdict}; separate gradients "
                f"(multi-tensor kernels): {t['gradflow'] / t['torch']:.3f}"
            )
    return lines


def environment(threads):
    import numba

    versions = [f"Python {platform.python_version()}", f"NumPy {np.__version__}",
                f"Numba {numba.__version__}"]
    for module in ("torch", "cupy"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    return [
        f"- command: `python benchmarks/bench_kernels.py {' '.join(sys.argv[1:])}`",
        f"- machine: {_cpu_model()}, {os.cpu_count()} logical CPUs, "
        f"{threads} thread(s) pinned",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- versions: {', '.join(versions)}",
    ]


def _cpu_model():
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def gpu_lines(gpu):
    if gpu is None:
        return ["GPU: not measured on a GPU yet."]
    launch = gpu["launch_us"]
    return [
        f"GPU: {gpu['device']}; device copy bandwidth {gpu['copy_gb_s']:.0f} GB/s; "
        f"host cost per launch {launch['gradflow']:.1f} µs (gradflow, including "
        f"the output allocation) vs {launch['numba default']:.1f} µs (CuPy arrays "
        "passed straight to the Numba kernel).",
        "",
        *format_activations(gpu["activations"], "cupy"),
        "",
        *format_clipping(gpu["clipping"]),
        "",
        *format_gpu_large(gpu["large"]),
    ]


def format_gpu_large(large):
    count, size = GPU_LARGE_CLIP
    lines = [f"H200 targets ({GPU_LARGE_ACTIVATION} float32 elements for the "
             f"activations; {count} gradients of {size} float32 for clipping):", ""]
    for name, tb_s in large["activations"].items():
        verdict = "met" if tb_s >= 4.0 else "not met"
        lines.append(f"- {name} backward: {tb_s:.2f} TB/s effective "
                     f"(target >= 4): {verdict}")
    for name, ms in large["clip_ms"].items():
        verdict = "met" if ms <= 3.1 else "not met"
        lines.append(f"- clip_grad_norm_, {name}: {ms:.2f} ms (target <= 3.1 ms, "
                     f"three launches for one dtype, by construction): {verdict}")
    return lines


def report(args, cpu_rows, clip_rows, gpu):
    lines = ["## Numba kernels (bench_kernels.py)", "", *environment(args.threads), ""]
    if cpu_rows:
        lines += ["CPU activation backward, float32:", "",
                  *format_activations(cpu_rows, "numpy"), ""]
        lines += ["CPU clip_grad_norm_, float32:", "", *format_clipping(clip_rows), ""]
        lines += ["Targets:", "", *check_targets(cpu_rows, clip_rows), ""]
    lines += gpu_lines(gpu)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for NumPy/BLAS, Numba and PyTorch (default 2)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved rounds per measurement (default 7)")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU part")
    parser.add_argument("--write-results", action="store_true",
                        help="replace this benchmark's section of the results file")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                        help="the results file that --write-results updates")
    args = parser.parse_args()
    pin_threads(args.threads)
    cpu_rows = clip_rows = None
    if not args.gpu_only:
        cpu_rows = bench_cpu_activations(args.rounds)
        clip_rows = bench_clipping(args.rounds)
    section = report(args, cpu_rows, clip_rows, bench_gpu(args.rounds))
    print(section)
    if args.write_results:
        write_section("bench_kernels", section, args.results)


if __name__ == "__main__":
    main()
