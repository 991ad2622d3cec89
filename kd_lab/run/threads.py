"""The run's CPU thread count (``threads`` in conf/train.yaml), applied once at the start of ``train()``.

The thread count changes results: a reduction split over more threads adds its floats in another order, so a
teacher or student trained with 2 threads ends with other weights than one trained with 1. torch's default
is one thread per core, so without a fixed count the numbers depend on the machine, and on the launcher
(joblib caps each parallel job at cores // n_jobs; Lightning's DDP launcher at cores // ranks).
"""

import os

import torch


def apply_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads in this process and in the processes it starts; return the count in
    effect. ``None`` keeps what torch chose (one per core, or what OMP_NUM_THREADS says).

    OMP_NUM_THREADS is set too, for two reasons. DDP ranks and data workers inherit it. Lightning's DDP
    launcher sets torch's threads to cores // ranks unless OMP_NUM_THREADS is set, and it does so after this
    runs, so without it the config's count would be overridden during the fit."""
    if threads is not None:
        torch.set_num_threads(int(threads))
        os.environ["OMP_NUM_THREADS"] = str(int(threads))
    return torch.get_num_threads()
