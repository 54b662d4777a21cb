"""Benchmarks, out of the core's way.

    side_by_side.py  `tinylora bench`: tinylora and PyTorch+PEFT on the same workloads, alternated, as ratios
    workers.py       one workload, one library, in a fresh process (what side_by_side.py spawns)
    kernels.py       `tinylora bench kernels`: every matmul path on the models' shapes, against np.matmul
"""
