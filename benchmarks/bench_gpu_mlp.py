"""The MLP training step on a GPU: gradflow on CUDA against PyTorch eager.

The workload is bench_framework.py's MLP step: ``depth`` x (Linear(width,
width) + GELU or ReLU) in float32, the mean of the output as the loss, then
backward and one Adam step (lr 1e-4, other options at their defaults). Two
cases run:

- large (batch 4096, width 4096): the matrix products dominate the step;
- small (batch 256, width 512, the CPU benchmark's shape): expected to be
  launch-bound on a GPU, because its kernels are so short that the step
  lasts as long as the host takes to issue them. The report checks this
  with the share of the step the host spends issuing it.

Both contenders run in this one process. CuPy and PyTorch both go through
the CUDA runtime, which uses one primary context per device and process
(CUDA Runtime API reference, "Interactions with the CUDA Driver API"), so
they share a context and the rounds interleave without a protocol between
processes. Before every timed block all queued work on the device is
synchronized and Python's garbage is collected, so neither library has work
or garbage of the other in flight. A block times ``repeats`` consecutive
steps between two CUDA events recorded on the contender's own stream. Each
figure is the median over the rounds that follow the warm-up steps, and the
order of the contenders alternates from round to round.

    python benchmarks/bench_gpu_mlp.py                  # print the section
    python benchmarks/bench_gpu_mlp.py --write-results  # and update RESULTS.md
    python benchmarks/bench_gpu_mlp.py --device cpu --dry-run   # tiny, on the CPU

Without a usable GPU for CuPy or for PyTorch it prints why and exits with
status 0; with --write-results it then writes the section as "not measured
on a GPU yet". The dry run uses tiny sizes and the host clock in place of
CUDA events; it checks the script, and its figures are no results.
"""

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
import sys
import time

import numpy as np

from _results import write_section

HERE = os.path.dirname(os.path.abspath(__file__))
TITLE = "## MLP training step on a GPU: gradflow against PyTorch eager"
TARGET = ("at least 0.95x PyTorch eager throughput when the step is dominated "
          "by matrix products")
TARGET_RATIO = 0.95
# Host issue time over step time above which a case counts as launch-bound.
LAUNCH_BOUND_SHARE = 0.8
LEARNING_RATE = 1e-4
ACTIVATIONS = ("gelu", "relu")


@dataclasses.dataclass
class Case:
    """One shape of the MLP step and how often to time it."""

    name: str
    batch: int
    width: int
    depth: int
    warmup: int
    rounds: int
    repeats: int

    def matmul_flops(self):
        # Forward: 2*b*w*w per layer. Backward: the input and weight
        # gradients, 2*b*w*w each, except that the first layer's input
        # needs no gradient.
        per_product = 2 * self.batch * self.width * self.width
        return per_product * (3 * self.depth - 1)


def cases_from(args):
    if args.dry_run:
        # Tiny sizes: they check the code path, not the speed.
        return [Case("large", 64, 64, 4, 1, 3, 1), Case("small", 16, 32, 4, 1, 3, 2)]
    return [
        Case("large", args.large_batch, args.large_width, args.depth,
             args.warmup, args.rounds, 1),
        Case("small", args.small_batch, args.small_width, args.depth,
             args.warmup, args.rounds, args.small_repeats),
    ]


# -- clocks ---------------------------------------------------------------------

# NOTE: the CUDA parts (these events, the device queries in
# environment_lines, release_memory) have not run on a GPU yet. The CPU dry
# run covers the rest of the code with HostEvent.


class HostEvent:
    """The host clock behind the CUDA event interface, for the CPU dry run."""

    def record(self):
        self.seconds = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_ms(self, end):
        return (end.seconds - self.seconds) * 1e3


class CupyEvent:
    """A CUDA event on CuPy's current stream, the stream gradflow launches on."""

    def __init__(self):
        import cupy

        self._cupy = cupy
        self._event = cupy.cuda.Event()

    def record(self):
        self._event.record()

    def synchronize(self):
        self._event.synchronize()

    def elapsed_ms(self, end):
        return self._cupy.cuda.get_elapsed_time(self._event, end._event)


class TorchEvent:
    """A CUDA event on PyTorch's current stream."""

    def __init__(self):
        import torch

        self._event = torch.cuda.Event(enable_timing=True)

    def record(self):
        self._event.record()

    def synchronize(self):
        self._event.synchronize()

    def elapsed_ms(self, end):
        return self._event.elapsed_time(end._event)


def cupy_synchronize():
    import cupy

    cupy.cuda.runtime.deviceSynchronize()


def torch_synchronize():
    import torch

    torch.cuda.synchronize()


@dataclasses.dataclass
class Contender:
    """One library's training step with the event type and synchronization of its device."""

    name: str
    step: object
    new_event: object
    synchronize: object


# -- the two contenders -----------------------------------------------------------


def build_gradflow(case, activation, device):
    """Return (contender, forward, parameters by name, input) for gradflow.

    ``forward`` returns the model's output on the host without recording a
    graph; the parameters and the input are host copies for PyTorch.
    """
    import gradflow as gf

    gf.manual_seed(0)
    layers = []
    for _ in range(case.depth):
        layers.append(gf.nn.Linear(case.width, case.width, device=device))
        layers.append(gf.nn.GELU() if activation == "gelu" else gf.nn.ReLU())
    model = gf.nn.Sequential(*layers)
    x = gf.randn(case.batch, case.width, device=device)
    optimizer = gf.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def step():
        optimizer.zero_grad()
        model(x).mean().backward()
        optimizer.step()

    def forward():
        with gf.no_grad():
            return model(x).cpu().numpy()

    params = {name: p.detach().cpu().numpy() for name, p in model.named_parameters()}
    if device == "cuda":
        contender = Contender("gradflow", step, CupyEvent, cupy_synchronize)
    else:
        contender = Contender("gradflow", step, HostEvent, lambda: None)
    return contender, forward, params, x.cpu().numpy()


def build_torch(case, activation, device, params, x_host):
    """Return (contender, forward) for PyTorch, starting from gradflow's weights."""
    import torch

    layers = []
    for _ in range(case.depth):
        layers.append(torch.nn.Linear(case.width, case.width, device=device))
        layers.append(torch.nn.GELU() if activation == "gelu" else torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            source = params[name]
            if tuple(p.shape) != source.shape:
                raise ValueError(f"parameter {name}: torch shape {tuple(p.shape)} "
                                 f"differs from gradflow's {source.shape}")
            p.copy_(torch.from_numpy(source))
    x = torch.from_numpy(x_host).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def step():
        optimizer.zero_grad()
        model(x).mean().backward()
        optimizer.step()

    def forward():
        with torch.no_grad():
            return model(x).cpu().numpy()

    if device == "cuda":
        contender = Contender("torch", step, TorchEvent, torch_synchronize)
    else:
        contender = Contender("torch", step, HostEvent, lambda: None)
    return contender, forward


def relative_difference(ours, reference):
    """Return ||ours - reference|| / ||reference|| in float64."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    scale = np.linalg.norm(reference)
    error = np.linalg.norm(ours - reference)
    if scale == 0:
        return 0.0 if error == 0 else float("inf")
    return float(error / scale)


# -- timing -------------------------------------------------------------------------


def time_block(contender, everyone, repeats):
    """Return (device ms, host ms) per step over ``repeats`` consecutive steps.

    The host figure is the time the host spent issuing the steps. When it is
    close to the device figure, the GPU waited for the host.
    """
    for other in everyone:
        other.synchronize()
    gc.collect()
    start, stop = contender.new_event(), contender.new_event()
    start.record()
    host_start = time.perf_counter()
    for _ in range(repeats):
        contender.step()
    host_ms = (time.perf_counter() - host_start) * 1e3
    stop.record()
    stop.synchronize()
    return start.elapsed_ms(stop) / repeats, host_ms / repeats


def measure(contenders, case):
    """Return {name: {"step_ms", "host_ms"}}: medians over interleaved rounds."""
    for contender in contenders:
        for _ in range(case.warmup):
            contender.step()
    samples = {c.name: [] for c in contenders}
    for round_index in range(case.rounds):
        order = contenders if round_index % 2 == 0 else contenders[::-1]
        for contender in order:
            samples[contender.name].append(time_block(contender, contenders,
                                                      case.repeats))
    result = {}
    for name, pairs in samples.items():
        result[name] = {"step_ms": statistics.median(p[0] for p in pairs),
                        "host_ms": statistics.median(p[1] for p in pairs)}
    return result


def release_memory(device):
    """Return cached device memory of both libraries to the driver."""
    gc.collect()
    if device != "cuda":
        return
    import cupy
    import torch

    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def run_case(case, activation, device):
    gradflow, gradflow_forward, params, x_host = build_gradflow(case, activation, device)
    torch_contender, torch_forward = build_torch(case, activation, device, params, x_host)
    del params
    difference = relative_difference(gradflow_forward(), torch_forward())
    # The collection before each timed block would otherwise walk every
    # object of both libraries: 0.19 s per collection with torch imported,
    # in the CPU dry run on a 2-core AMD EPYC VM. Frozen objects are skipped.
    gc.collect()
    gc.freeze()
    try:
        times = measure([gradflow, torch_contender], case)
    finally:
        gc.unfreeze()
    del gradflow, torch_contender, gradflow_forward, torch_forward
    release_memory(device)
    return {"case": case, "activation": activation, "times": times,
            "difference": difference}


# -- availability -----------------------------------------------------------------


def cuda_problem():
    """Return why the GPU benchmark cannot run here, or None when it can."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    except Exception as error:  # an installed build whose CUDA libraries fail to load
        return f"PyTorch failed to import: {error!r}"
    if not torch.cuda.is_available():
        return (f"PyTorch {torch.__version__} sees no usable CUDA device"
                + (" (a CPU-only build)" if torch.version.cuda is None else ""))
    import gradflow as gf

    if gf.cuda.is_available():
        return None
    try:
        gf.device("cuda").xp
    except RuntimeError as error:
        return f"gradflow cannot use CUDA: {error}"
    return "gradflow reports no usable CUDA device"


# -- report ---------------------------------------------------------------------------


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_lines(device):
    import torch

    versions = [f"Python {platform.python_version()}", f"NumPy {np.__version__}"]
    for label, name in (("gradflow", "gradflow"), ("Numba", "numba"),
                        ("numba-cuda", "numba-cuda"), ("CuPy", "cupy-cuda13x"),
                        ("CuPy", "cupy-cuda12x"), ("torch", "torch")):
        version = package_version(name)
        if version:
            versions.append(f"{label} {version}")
    if device == "cuda":
        import cupy

        props = torch.cuda.get_device_properties(0)
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        driver = cupy.cuda.runtime.driverGetVersion()
        machine = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute "
                   f"capability {props.major}.{props.minor}; CUDA runtime "
                   f"{runtime // 1000}.{runtime % 1000 // 10} (CuPy), driver API "
                   f"{driver // 1000}.{driver % 1000 // 10}, torch built for CUDA "
                   f"{torch.version.cuda}")
    else:
        machine = f"CPU ({platform.processor() or platform.machine()}), dry run"
    return [
        f"- command: `python benchmarks/bench_gpu_mlp.py {' '.join(sys.argv[1:])}`",
        f"- device: {machine}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- versions: {', '.join(versions)}",
        "- float32 matrix products: torch float32 matmul precision "
        f"\"{torch.get_float32_matmul_precision()}\" (\"highest\" means no TF32), "
        f"CUPY_TF32={os.environ.get('CUPY_TF32', 'unset')} (TF32 only when 1)",
    ]


def format_rows(results):
    lines = [
        "| case | activation | batch x width | gradflow ms | torch ms "
        "| gradflow / torch throughput | gradflow TFLOP/s | torch TFLOP/s "
        "| host issue / step, gradflow | host issue / step, torch "
        "| output difference |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        lines.append(format_row(result))
    return lines


def format_row(result):
    case, times = result["case"], result["times"]
    ours, theirs = times["gradflow"], times["torch"]
    flops = case.matmul_flops()
    cells = [
        case.name, result["activation"], f"{case.batch} x {case.width}",
        f"{ours['step_ms']:.3f}", f"{theirs['step_ms']:.3f}",
        f"{throughput_ratio(result):.3f}x",
        f"{flops / ours['step_ms'] / 1e9:.2f}", f"{flops / theirs['step_ms'] / 1e9:.2f}",
        f"{ours['host_ms'] / ours['step_ms']:.2f}",
        f"{theirs['host_ms'] / theirs['step_ms']:.2f}",
        f"{result['difference']:.1e}",
    ]
    return "| " + " | ".join(cells) + " |"


def throughput_ratio(result):
    times = result["times"]
    return times["torch"]["step_ms"] / times["gradflow"]["step_ms"]


def target_line(results):
    large = [r for r in results if r["case"].name == "large"]
    ratios = ", ".join(f"{r['activation']} {throughput_ratio(r):.3f}x" for r in large)
    verdict = "met" if all(throughput_ratio(r) >= TARGET_RATIO for r in large) else "not met"
    return f"Target: {TARGET} (the large case): {ratios}: {verdict}."


def measured_section(args, results):
    large, small = cases_from(args)
    lines = [TITLE, ""]
    if args.dry_run:
        lines += ["Dry run with tiny sizes: these figures check the script and are "
                  "no results.", ""]
    clock = "CUDA events" if args.device == "cuda" else "the host clock"
    lines += environment_lines(args.device)
    lines += [
        f"- workload: {large.depth} x (Linear(width, width) + activation), float32, "
        "loss = mean of the output; one step = zero_grad, forward, backward and "
        f"Adam (lr {LEARNING_RATE:g}, other options at their defaults)",
        f"- timing: after {large.warmup} warm-up step(s) per contender, the median "
        f"of {large.rounds} interleaved rounds; a round times {large.repeats} "
        f"step(s) (large) or {small.repeats} steps (small) per contender with "
        f"{clock}, after a device-wide synchronize",
        "",
        *format_rows(results),
        "",
        "Throughput ratio: torch ms / gradflow ms, so above 1 means gradflow is "
        "faster. TFLOP/s counts the matrix products alone. Host issue / step: "
        "the host's time to issue a step over the step's time on the device; "
        "near 1 the GPU waits for the host. Output difference: "
        "||gradflow - torch|| / ||torch|| of the first forward output, from the "
        "same weights and input.",
        "",
    ]
    if args.device == "cuda" and not args.dry_run:
        lines += [target_line(results), ""]
    lines.append(small_case_note(results, small))
    return "\n".join(lines)


def small_case_note(results, small):
    """Return the paragraph on the small case, judged by its host issue share."""
    shares = [r["times"]["gradflow"]["host_ms"] / r["times"]["gradflow"]["step_ms"]
              for r in results if r["case"].name == "small"]
    size = (f"The small case (batch {small.batch}, width {small.width}, "
            f"{2 * small.batch * small.width ** 2 / 1e6:.3g} MFLOP per matrix product)")
    if shares and min(shares) >= LAUNCH_BOUND_SHARE:
        return (f"{size} is launch-bound: gradflow's host spent at least "
                f"{min(shares):.0%} of each step issuing it, so the GPU waited for "
                "the host. Its ratio compares the per-op host cost of gradflow's "
                "Python tape with PyTorch's C++ dispatcher, not the speed of the "
                "matrix products.")
    return (f"{size} was expected to be launch-bound, but gradflow's host issue "
            f"time was only {min(shares, default=0):.0%} of the step time, so the "
            "device, not the host, set part of the step's time.")


def placeholder_section(args):
    large, small = cases_from(args)
    return "\n".join([
        TITLE,
        "",
        "Not measured on a GPU yet. Run `python benchmarks/bench_gpu_mlp.py "
        "--write-results` on a machine with an NVIDIA GPU, CuPy and PyTorch "
        "with CUDA; `bash benchmarks/gpu_check.sh` runs it among the other GPU "
        "checks.",
        "",
        f"- workload: {large.depth} x (Linear(width, width) + GELU or ReLU), "
        "float32, forward + backward + Adam step, gradflow on `cuda` against "
        "PyTorch eager on the same GPU",
        f"- cases: large (batch {large.batch}, width {large.width}), where the "
        f"matrix products dominate; small (batch {small.batch}, width "
        f"{small.width}), expected to be launch-bound",
        f"- target: {TARGET}: not measured on a GPU yet",
    ])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where both contenders run (default cuda; cpu needs "
                             "--dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes and few rounds, to check the script")
    parser.add_argument("--activations", nargs="+", choices=ACTIVATIONS,
                        default=list(ACTIVATIONS), help="activations to run "
                        "(default: gelu relu)")

    parser.add_argument("--depth", type=int, default=32,
                        help="Linear + activation blocks (default 32)")
    parser.add_argument("--large-batch", type=int, default=4096,
                        help="rows per batch in the large case (default 4096)")
    parser.add_argument("--large-width", type=int, default=4096,
                        help="features per layer in the large case (default 4096)")
    parser.add_argument("--small-batch", type=int, default=256,
                        help="rows per batch in the small case (default 256)")
    parser.add_argument("--small-width", type=int, default=512,
                        help="features per layer in the small case (default 512)")

    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per contender before timing (default 2)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved timing rounds (default 7)")
    parser.add_argument("--small-repeats", type=int, default=10,
                        help="steps per timed block in the small case (default 10; "
                             "the large case times one step per block)")

    parser.add_argument("--write-results", action="store_true",
                        help="replace this benchmark's section of the results file")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                        help="the results file that --write-results updates")

    args = parser.parse_args(argv)
    for option in ("depth", "large_batch", "large_width", "small_batch",
                   "small_width", "rounds", "small_repeats"):
        value = getattr(args, option)
        if value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.device == "cpu" and not args.dry_run:
        parser.error("--device cpu runs only with --dry-run; bench_framework.py "
                     "measures the MLP step on the CPU")
    if args.dry_run and args.write_results:
        parser.error("--write-results records GPU figures and cannot be combined "
                     "with --dry-run")
    return args


def main(argv=None):
    args = parse_args(argv)
    problem = cuda_problem() if args.device == "cuda" else None
    if problem is not None:
        print(f"bench_gpu_mlp: skipped, no GPU to measure on: {problem}.")
        if args.write_results:
            write_section("bench_gpu_mlp", placeholder_section(args), args.results)
            print(f"bench_gpu_mlp: wrote the \"not measured on a GPU yet\" section "
                  f"to {args.results}")
        return 0
    cases = cases_from(args)
    results = []
    # One activation at a time, both cases, so that a run stopped by a time
    # limit has measured both cases of the first activation. Each row is
    # printed as it finishes for the same reason.
    for activation in args.activations:
        for case in cases:
            result = run_case(case, activation, args.device)
            results.append(result)
            print(format_row(result), file=sys.stderr, flush=True)
    results.sort(key=lambda r: (cases.index(r["case"]),
                                args.activations.index(r["activation"])))
    section = measured_section(args, results)
    print(section)
    if args.write_results:
        write_section("bench_gpu_mlp", section, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
