"""What host memory for extracted rows costs on a GPU machine: registering fresh memory with CUDA (as
``backends/taps/device_rows.py`` does for each new block), with its pages faulted in first or not, on the
calling thread or on another one (through ``ctypes``, which lets the interpreter go) while the calling thread
launches kernels, and how fast a GPU writes rows into mapped host memory against a copy engine's transfer.

    python3 scratch/bench_host_memory.py [--block-mib 256] [--blocks 8]      (GPU machine)

Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import threading
import time

import numpy as np
import torch

PORTABLE_MAPPED = 0x03
MADV_POPULATE_WRITE = 23


def report(name: str, **values) -> None:
    print(json.dumps({"measure": name, **{key: round(value, 4) if isinstance(value, float) else value
                                          for key, value in values.items()}}), flush=True)


class Driver:
    """cuMemHostRegister through ctypes: the call releases the interpreter."""

    def __init__(self, device: int = 0) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.context = ctypes.c_void_p()
        assert self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), device) == 0

    def register(self, array: np.ndarray) -> None:
        assert self.lib.cuCtxSetCurrent(self.context) == 0
        error = self.lib.cuMemHostRegister_v2(ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(array.nbytes),
                                              ctypes.c_uint(PORTABLE_MAPPED))
        assert error == 0, error

    def unregister(self, array: np.ndarray) -> None:
        assert self.lib.cuCtxSetCurrent(self.context) == 0
        self.lib.cuMemHostUnregister(ctypes.c_void_p(array.ctypes.data))


def populate(array: np.ndarray) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    start = array.ctypes.data & ~(mmap.PAGESIZE - 1)
    length = array.ctypes.data + array.nbytes - start
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_POPULATE_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE)")


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def registration(size: int, blocks: int, driver: Driver) -> None:
    torch_cudart = torch.cuda.cudart()
    for how in ("fresh-torch", "fresh-ctypes", "touched", "populated"):
        seconds, prepare = [], []
        for _ in range(blocks):
            array = np.empty(size, dtype=np.uint8)
            if how == "touched":
                prepare.append(timed(array.fill, 1))
            elif how == "populated":
                prepare.append(timed(populate, array))
            if how == "fresh-torch":
                seconds.append(timed(torch_cudart.cudaHostRegister, array.ctypes.data, array.nbytes, PORTABLE_MAPPED))
                torch_cudart.cudaHostUnregister(array.ctypes.data)
            else:
                seconds.append(timed(driver.register, array))
                driver.unregister(array)
            del array
        report("register", how=how, block_mib=size >> 20, seconds_per_block=float(np.median(seconds)),
               gb_per_s=size / np.median(seconds) / 1e9, prepare_s=float(np.median(prepare)) if prepare else 0.0)


def launch_loop(steps: int = 3000) -> float:
    """Host seconds for ``steps`` small kernels with a synchronization every 100 (an engine's thread, roughly)."""
    x = torch.zeros(1024, device="cuda")
    start = time.perf_counter()
    for step in range(steps):
        x.add_(1)
        if step % 100 == 99:
            torch.cuda.synchronize()
    return time.perf_counter() - start


def interference(size: int, blocks: int, driver: Driver) -> None:
    launch_loop(300)
    alone = min(launch_loop() for _ in range(3))
    for how in ("fresh", "populated"):
        arrays = [np.empty(size, dtype=np.uint8) for _ in range(blocks)]
        if how == "populated":
            for array in arrays:
                populate(array)
        done = threading.Event()

        def register_all() -> None:
            for array in arrays:
                driver.register(array)
            done.set()

        thread = threading.Thread(target=register_all)
        start = time.perf_counter()
        thread.start()
        loops, busy = 0, 0.0
        while not done.is_set():
            busy += launch_loop()
            loops += 1
        thread.join()
        wall = time.perf_counter() - start
        for array in arrays:
            driver.unregister(array)
        report("launches-beside-registration", how=how, blocks=blocks, register_s=wall,
               loop_s_alone=alone, loop_s_beside=busy / max(loops, 1), loops=loops)


def writes(size: int, driver: Driver) -> None:
    row_bytes = 4096
    rows = size // row_bytes
    source = torch.randint(0, 255, (rows, row_bytes), dtype=torch.uint8, device="cuda")
    array = np.empty(size, dtype=np.uint8)
    driver.register(array)
    host = array.reshape(rows, row_bytes)

    class Mapped:
        __cuda_array_interface__ = {"shape": (rows, row_bytes), "typestr": "|u1", "data": (array.ctypes.data, False),
                                    "version": 3}

    view = torch.as_tensor(Mapped(), device="cuda")
    pinned = torch.empty((rows, row_bytes), dtype=torch.uint8, pin_memory=True)
    order = torch.randperm(rows, device="cuda")
    for name, write in (("copy-mapped", lambda: view.copy_(source)),
                        ("index_copy-mapped", lambda: view.index_copy_(0, order, source)),  # the last mapped write
                        ("dma-pinned", lambda: pinned.copy_(source, non_blocking=True))):
        write()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            write()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / 5
        report("device-writes", how=name, mib=size >> 20, gb_per_s=size / seconds / 1e9)
    assert torch.equal(torch.from_numpy(host[order.cpu().numpy()[:8]].copy()), source[:8].cpu())
    driver.unregister(array)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-mib", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=8)
    args = parser.parse_args()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as settings:
        report("host", transparent_hugepages=settings.read().strip(), device=torch.cuda.get_device_name())
    driver = Driver()
    size = args.block_mib << 20
    registration(size, args.blocks, driver)
    interference(size, args.blocks, driver)
    writes(size, driver)


if __name__ == "__main__":
    main()
