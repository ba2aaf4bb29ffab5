"""Thread settings that the parallel CPU kernels need before their first launch."""

import os


def limit_openmp_spinning():
    """Make Numba's OpenMP worker threads sleep as soon as a kernel ends.

    By default GNU OpenMP workers busy-wait for the next parallel region.
    Between two kernels, gradflow runs OpenBLAS matrix products, whose own
    threads then compete with the spinning workers for the same cores; on a
    2-core machine an MLP's backward pass measured about 2.5x slower that
    way (benchmarks/RESULTS.md). A value the user has set is kept, and the
    setting takes effect only if the OpenMP runtime has not started yet.
    """
    os.environ.setdefault("GOMP_SPINCOUNT", "0")
