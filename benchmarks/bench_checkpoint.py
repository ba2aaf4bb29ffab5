"""Memory against recomputation: gradient checkpointing modes on deep chains.

For a chain of equal Linear+GELU blocks and a residual stack of the same
depth (float32), it compares: no checkpointing, uniform sqrt(n) segments,
the selective policy (matmul outputs kept, the rest recomputed op by op, at
most 4 and 8 ops per saved array), and ``gf.checkpoint_plan`` at several
budgets. For each it reports the peak of
activation bytes from ``gf.memory.Ledger``, the allocator peak from
``gf.memory.peak`` (tracemalloc on the CPU, in a separate run because it
slows Python), the step time (forward plus backward, timed in separate
rounds that interleave the modes; the fastest round is kept, because other
processes may share the cores), the number of recomputed block forwards,
and the largest gradient difference from the run without checkpointing.

Run:            python benchmarks/bench_checkpoint.py
Quicker:        python benchmarks/bench_checkpoint.py --depths 64 --repeats 3
Also write benchmarks/RESULTS.md's section and the plot:  --write-results
"""

import argparse
import datetime
import math
import os
import platform
import sys
import time

import numpy as np

from _results import write_section

import gradflow as gf

HERE = os.path.dirname(os.path.abspath(__file__))
PLOT = os.path.join(HERE, "checkpoint_tradeoff.png")
BUDGET_FRACTIONS = (0.5, 0.25, 0.1, 0.05)


class Residual(gf.nn.Module):
    """x + GELU(Linear(x))."""

    def __init__(self, width, device):
        super().__init__()
        self.linear = gf.nn.Linear(width, width, device=device)
        self.act = gf.nn.GELU()

    def forward(self, x):
        return x + self.act(self.linear(x))


class Counted(gf.nn.Module):
    """A block that counts its forward calls, recomputed ones included."""

    def __init__(self, block, counter):
        super().__init__()
        self.block = block
        self.counter = counter

    def forward(self, x):
        self.counter[0] += 1
        return self.block(x)


def build(kind, depth, width, device, counter):
    gf.manual_seed(0)
    blocks = []
    for _ in range(depth):
        if kind == "chain":
            block = gf.nn.Sequential(gf.nn.Linear(width, width, device=device),
                                     gf.nn.GELU())
        else:
            block = Residual(width, device)
        blocks.append(Counted(block, counter))
    return gf.nn.Sequential(*blocks)


def synchronize(device):
    if device.type == "cuda":
        device.xp.cuda.get_current_stream().synchronize()


def step(model, run, x):
    # The mean saves nothing for backward, so the ledger counts the model alone.
    model.zero_grad()
    run(x).mean().backward()


def gradients(model):
    return [gf.Tensor(p.grad.data).cpu().numpy() for p in model.parameters()]


def measure_memory(model, run, x, device, counter):
    """Return the ledger peak, allocator peak, recomputed forwards and gradients."""
    counter[0] = 0
    with gf.memory.Ledger() as ledger:
        step(model, run, x)
    recomputed = counter[0] - len(list(model.children()))
    grads = gradients(model)
    with gf.memory.peak(device) as allocator:
        step(model, run, x)
    return {
        "ledger": ledger.peak_activation_bytes,
        "allocator": allocator.peak_bytes,
        "recomputed": recomputed,
        "grads": grads,
    }


def timed(device, work):
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def unrecorded_forward(layers, x):
    with gf.no_grad():
        for layer in layers:
            x = layer(x)


def time_modes(model, rows, x, device, floor_layers, repeats):
    # Rounds interleave the modes, so that a slow spell of the shared
    # machine hits every mode alike. Each mode keeps its fastest round.
    floor = []
    for row in rows:
        row["times"] = []
    for _ in range(repeats):
        for row in rows:
            row["times"].append(timed(device, lambda: step(model, row["run"], x)))
        floor.append(timed(device, lambda: unrecorded_forward(floor_layers, x)))
    for row in rows:
        row["seconds"] = min(row["times"])
    return min(floor)


def run_config(kind, depth, width, batch, device, repeats):
    counter = [0]
    model = build(kind, depth, width, device, counter)
    layers = list(model.children())
    x = gf.randn(batch, width, device=device)
    segments = max(1, round(math.sqrt(depth)))
    policy = gf.checkpoint.Policy()
    deeper = gf.checkpoint.Policy(max_recomputed_ops=8)
    rows = [
        {"name": "none", "run": lambda t: model(t)},
        {"name": f"uniform {segments} segments",
         "run": lambda t: gf.checkpoint_sequential(model, segments, t)},
        {"name": "selective (4 ops)",
         "run": lambda t: gf.checkpoint(model, t, policy=policy)},
        {"name": "selective (8 ops)",
         "run": lambda t: gf.checkpoint(model, t, policy=deeper)},
    ]

    rows[0].update(measure_memory(model, rows[0]["run"], x, device, counter))
    plain = rows[0]
    for fraction in BUDGET_FRACTIONS:
        budget = int(plain["ledger"] * fraction)
        try:
            plan = gf.checkpoint_plan(model, x, budget)
        except ValueError as error:
            rows.append({"name": f"plan {fraction:.2f}x", "error": str(error)})
            continue
        rows.append({"name": f"plan {fraction:.2f}x ({plan.kind})", "plan": plan,
                     "run": lambda t, plan=plan: plan.run(model, t)})

    runnable = [row for row in rows if "run" in row]
    for row in runnable[1:]:
        row.update(measure_memory(model, row["run"], x, device, counter))

    last = gf.checkpoint.segment_bounds(depth, segments)[-1][0]
    forward = time_modes(model, runnable, x, device, layers[:last], repeats)
    for row in runnable:
        row["max_diff"] = max(float(np.max(np.abs(a - b)))
                              for a, b in zip(plain["grads"], row["grads"]))
        row["bitwise"] = all(np.array_equal(a, b)
                             for a, b in zip(plain["grads"], row["grads"]))
    return {"kind": kind, "depth": depth, "rows": rows,
            "floor": plain["seconds"] + forward, "plain": plain}


def format_config(config, width, batch):
    plain = config["plain"]
    lines = [
        f"**{config['kind']}, {config['depth']} blocks** (width {width}, batch "
        f"{batch}); recompute floor for uniform segments: "
        f"{config['floor'] * 1e3:.1f} ms",
        "",
        "| mode | ledger peak (MiB) | x plain | allocator peak (MiB) | step (ms) "
        "| x plain | recomputed forwards | predicted peak (MiB) | grads |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in config["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['error']} | | | | | | | |")
            continue
        plan = row.get("plan")
        predicted = f"{plan.predicted_peak_bytes / 2**20:.2f}" if plan else ""
        grads = "bitwise equal" if row["bitwise"] else f"max diff {row['max_diff']:.1e}"
        lines.append(
            f"| {row['name']} | {row['ledger'] / 2**20:.2f} | "
            f"{row['ledger'] / plain['ledger']:.3f} | "
            f"{row['allocator'] / 2**20:.2f} | {row['seconds'] * 1e3:.1f} | "
            f"{row['seconds'] / plain['seconds']:.3f} | {row['recomputed']} | "
            f"{predicted} | {grads} |"
        )
    return lines


def check_targets(config):
    """Return lines stating which targets the 64-block chain meets."""
    rows = {row["name"].split(" ")[0]: row for row in config["rows"]}
    plain, uniform = rows["none"], rows["uniform"]
    selective = next(row for row in config["rows"]
                     if row["name"] == "selective (4 ops)")
    memory_ratio = uniform["ledger"] / plain["ledger"]
    time_ratio = uniform["seconds"] / config["floor"]
    cut = 1 - selective["ledger"] / plain["ledger"]
    slow = selective["seconds"] / plain["seconds"]
    errors = [abs(r["ledger"] - r["plan"].predicted_peak_bytes)
              / r["plan"].predicted_peak_bytes
              for r in config["rows"] if r.get("plan") is not None]
    return [
        f"- uniform segments keep {memory_ratio:.3f}x the activation memory "
        f"(target at most 0.28x: {'met' if memory_ratio <= 0.28 else 'not met'}) "
        f"at {time_ratio:.3f}x the recompute floor (target within 1.05x: "
        f"{'met' if time_ratio <= 1.05 else 'not met'}).",
        f"- the selective policy (4 ops) cuts activation memory by {cut * 100:.0f} % "
        f"(target at least 40 %: {'met' if cut >= 0.4 else 'not met'}) at "
        f"{slow:.3f}x the plain step (target at most 1.05x: "
        f"{'met' if slow <= 1.05 else 'not met'}).",
        f"- planner: measured ledger peak within {max(errors) * 100:.1f} % of "
        f"the predicted peak (target 10 %: "
        f"{'met' if max(errors) <= 0.10 else 'not met'}).",
    ]


def plot(configs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2 if len(configs) > 1 else 1
    rows = -(-len(configs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.2 * rows),
                             squeeze=False)
    for axis, config in zip(axes.flat, configs):
        for row in config["rows"]:
            if "error" in row:
                continue
            axis.scatter(row["seconds"] * 1e3, row["ledger"] / 2**20)
            label = row["name"].split(" (")[0] if "plan" in row else row["name"]
            axis.annotate(label, (row["seconds"] * 1e3,
                          row["ledger"] / 2**20), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
        axis.set_title(f"{config['kind']}, {config['depth']} blocks")
        axis.set_xlabel("step time (ms)")
        axis.set_ylabel("peak activation memory (MiB)")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[64, 128],
                        help="numbers of blocks to run (default: 64 128)")
    # Wide blocks keep the matrix products dominant, as in real models, so
    # recomputing the elementwise ops costs little next to them.
    parser.add_argument("--width", type=int, default=1024,
                        help="features per block (default: 1024)")
    parser.add_argument("--batch", type=int, default=16,
                        help="rows per input batch (default: 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads (default: 1, steadier on shared cores)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timing rounds; each mode's fastest is reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--write-results", action="store_true",
                        help="write the RESULTS.md section and the PNG plot")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    device = gf.device(args.device)
    started = time.perf_counter()
    configs = []
    for depth in args.depths:
        for kind in ("chain", "residual"):
            configs.append(run_config(kind, depth, args.width, args.batch, device,
                                      args.repeats))
            print(f"{kind} {depth}: done", file=sys.stderr)
    lines = [
        "## Gradient checkpointing: memory against recomputation",
        "",
        "Command: `" + " ".join(["python benchmarks/bench_checkpoint.py"]
                                + sys.argv[1:]) + "`",
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, {platform.system()}; device {device}. "
        f"Date: {datetime.date.today().isoformat()}. Python "
        f"{platform.python_version()}, NumPy {np.__version__}, gradflow "
        f"{gf.__version__}; {args.threads} BLAS thread(s). Run time "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        "Peaks count the activation bytes the tape keeps (gf.memory.Ledger; "
        "parameters and the input batch are excluded). The allocator peak is "
        "tracemalloc's, above the start of the step, from a separate run. Step "
        "times are the fastest of separate runs. Recomputed forwards count block "
        "forwards beyond the plain step's one per block. The loss is the mean of "
        "the output, which saves nothing.",
        "",
    ]
    for config in configs:
        lines += format_config(config, args.width, args.batch) + [""]
    chain64 = next((c for c in configs if c["kind"] == "chain" and c["depth"] == 64),
                   None)
    if chain64 is not None:
        lines += ["Targets, 64-block chain:", ""] + check_targets(chain64) + [""]
    lines += [
        "Notes:",
        "",
        "- At this shape the allocator peak is dominated by the weight "
        "gradients (4 MiB per block), so it moves little between modes; the "
        "ledger column shows the activations alone.",
        "- A Linear+GELU block keeps two arrays for backward: the GELU input "
        "(the Linear output, which the policy keeps) and the next Linear's "
        "input (the GELU output). The selective policy stores the second as "
        "\"GELU of the first\" and recomputes it when backward reads it, so "
        "the chain keeps about half, plus one recomputed array at a time.",
        "- The selective rows recompute single ops, never a whole block, so "
        "their recomputed-forwards column is 0.",
        "- In the residual stack the next Linear's input is the running sum, "
        "which depends on every block before it. A saved sum is recomputed "
        "from the nearest sum that is saved as it is, so a larger "
        "max_recomputed_ops saves fewer sums but recomputes more ops.",
        "- The machine's cores are shared with other processes, so step times "
        "vary between rounds; a mode that appears faster than the plain step "
        "shows that noise.",
        "",
    ]
    if device.type == "cpu":
        lines.append("GPU: not measured on a GPU yet (run with --device cuda).")
    text = "\n".join(lines)
    print(text)
    if args.write_results:
        write_section("bench_checkpoint", text)
        plot(configs)


if __name__ == "__main__":
    main()
