"""Time per phase of the graph-scaling step, by graph size.

The step is the one of bench_framework.py's scaling workloads,
``y = y * 0.5 + y * 0.5`` (three records). For each number of steps it
builds the graph, runs backward and frees the graph, and prints the median
time per step of each phase and the page faults per run (from getrusage),
over ``--repeats`` runs after one warm-up run.

Run:      python benchmarks/scaling_phases.py
Quicker:  python benchmarks/scaling_phases.py --steps 10000 100000 --repeats 3
"""

import argparse
import resource
import statistics
import time

import gradflow as gf


def page_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def one_run(steps):
    """Return the seconds of the forward, backward and freeing, and the page faults."""
    x = gf.tensor([0.5], requires_grad=True)
    faults = page_faults()
    start = time.perf_counter()
    y = x
    for _ in range(steps):
        y = y * 0.5 + y * 0.5
    loss = y.sum()
    forward_end = time.perf_counter()
    loss.backward()
    backward_end = time.perf_counter()
    del y, loss
    free_end = time.perf_counter()
    return (forward_end - start, backward_end - forward_end, free_end - backward_end,
            page_faults() - faults)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10_000, 30_000, 100_000],
                        help="graph sizes in steps (default 10000 30000 100000)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per size after one warm-up run (default 5)")
    args = parser.parse_args()
    if args.repeats < 1 or min(args.steps) < 1:
        parser.error("--steps and --repeats must be 1 or more")

    print("| steps | forward (ns/step) | backward (ns/step) | freeing (ns/step) | page faults |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for steps in args.steps:
        one_run(steps)
        runs = [one_run(steps) for _ in range(args.repeats)]
        forward, backward, freeing, faults = (statistics.median(column) for column in zip(*runs))
        print(f"| {steps:,} | {forward / steps * 1e9:,.0f} | {backward / steps * 1e9:,.0f} "
              f"| {freeing / steps * 1e9:,.0f} | {faults:,.0f} |")


if __name__ == "__main__":
    main()
