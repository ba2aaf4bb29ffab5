"""Random number generation: one generator per device, seeded together.

The CPU generator is NumPy's PCG64. A CUDA device's generator is a seed and
a counter: each draw builds CuPy's generator from (seed, counter), so its
whole state is two integers that can be saved and restored exactly (the
checkpointing recomputation replays dropout masks that way).
"""

import numpy as np

from . import _device

__all__ = ["manual_seed", "seed", "get_rng_state", "set_rng_state", "generator_for"]

_DEFAULT_SEED = 0x5EED


class CPUGenerator:
    """The random state of the CPU."""

    def __init__(self, seed=_DEFAULT_SEED):
        self.manual_seed(seed)

    def manual_seed(self, seed):
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def get_state(self):
        return self.rng.bit_generator.state

    def set_state(self, state):
        self.rng.bit_generator.state = state

    def draw(self):
        return self.rng


class CUDAGenerator:
    """The random state of one CUDA device: a seed and a draw counter."""

    def __init__(self, index, seed=_DEFAULT_SEED):
        self.index = index
        self.manual_seed(seed)

    def manual_seed(self, seed):
        self.seed = int(seed)
        self.counter = 0

    def get_state(self):
        return {"seed": self.seed, "counter": self.counter}

    def set_state(self, state):
        self.seed = int(state["seed"])
        self.counter = int(state["counter"])

    def draw(self):
        # Without a usable GPU, Device.xp raises a RuntimeError that says how
        # to fall back to the CPU.
        cupy = _device.Device("cuda", self.index).xp
        key = np.random.SeedSequence([self.seed, self.counter]).generate_state(1)[0]
        self.counter += 1
        return cupy.random.default_rng(int(key))


_cpu = CPUGenerator()
_cuda = {}


def generator_for(dev):
    """Return the generator object of Device ``dev``."""
    if dev.type == "cpu":
        return _cpu
    if dev.index not in _cuda:
        _cuda[dev.index] = CUDAGenerator(dev.index, _cpu_seed[0])
    return _cuda[dev.index]


_cpu_seed = [_DEFAULT_SEED]


def manual_seed(seed):
    """Seed the generators of the CPU and of every CUDA device."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"manual_seed expects a non-negative int, got {seed!r}")
    _cpu_seed[0] = int(seed)
    _cpu.manual_seed(int(seed))
    for gen in _cuda.values():
        gen.manual_seed(int(seed))


def seed():
    """Seed every generator from the operating system's entropy; return the seed."""
    value = int(np.random.SeedSequence().entropy % (2**63))
    manual_seed(value)
    return value


def get_rng_state(device=None):
    """Return the state of the generator of ``device`` (default: the CPU)."""
    return generator_for(_device.device(device or "cpu")).get_state()


def set_rng_state(state, device=None):
    """Restore a state returned by ``get_rng_state`` for ``device``."""
    generator_for(_device.device(device or "cpu")).set_state(state)


def all_rng_states():
    """Return the states of every generator created so far, by device."""
    states = {"cpu": _cpu.get_state()}
    for index, gen in _cuda.items():
        states[f"cuda:{index}"] = gen.get_state()
    return states


def set_all_rng_states(states):
    """Restore states returned by ``all_rng_states``."""
    for name, state in states.items():
        set_rng_state(state, name)
