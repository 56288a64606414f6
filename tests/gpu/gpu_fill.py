"""Fill a GPU's memory so that only a chosen amount stays free, for the tests of short GPU memory.

``fill_gpu(leave_bytes)`` takes the current device's memory with driver allocations
(``lmcd.cudadrv.DeviceBuffer``, exact sizes in 2 MiB granules, unlike torch's caching
allocator, which rounds small requests up to 20 MiB segments): first a hole of ``leave_bytes``,
then everything else in shrinking pieces until the driver refuses even 2 MiB, then the hole is
freed, so that ``leave_bytes`` (plus less than 2 MiB) are free in one range. The memory stays
taken while the returned buffers live (the process exits, or ``free_all``).

Run as a program (``python -m tests.gpu.gpu_fill --leave-mib N``) it fills GPU 0 for another
process, prints ``FULL <free bytes>`` and holds the memory until its stdin closes or a line arrives.
"""

from __future__ import annotations

import argparse
import sys

from lmcd import cudadrv

PIECES = (1 << 30, 64 << 20, 2 << 20)


def fill_gpu(leave_bytes: int) -> list[cudadrv.DeviceBuffer]:
    """Take all of the current device's free memory but about ``leave_bytes`` (module docstring)."""
    hole = cudadrv.DeviceBuffer(leave_bytes) if leave_bytes else None
    held: list[cudadrv.DeviceBuffer] = []
    try:
        for piece in PIECES:
            while True:
                try:
                    held.append(cudadrv.DeviceBuffer(piece))
                except cudadrv.CudaError as exc:
                    if exc.result != cudadrv.CUDA_ERROR_OUT_OF_MEMORY:
                        raise
                    break
    except BaseException:
        free_all(held)
        raise
    finally:
        if hole is not None:
            hole.free()
    return held


def free_all(held: list[cudadrv.DeviceBuffer]) -> None:
    for buffer in held:
        buffer.free()
    held.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--leave-mib", type=float, default=0.0, help="MiB to leave free")
    args = parser.parse_args()
    import torch

    torch.cuda.set_device(args.device)
    torch.zeros(1, device=args.device)
    torch.cuda.synchronize(args.device)  # the device's primary context is current on this thread from here
    held = fill_gpu(int(args.leave_mib * 2**20))
    print(f"FULL {torch.cuda.mem_get_info(args.device)[0]}", flush=True)
    sys.stdin.readline()  # hold the memory until the test is done with it
    free_all(held)
    return 0


if __name__ == "__main__":
    sys.exit(main())
