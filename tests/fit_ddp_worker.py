"""Run by ``torchrun --nproc_per_node 2`` in tests/test_fit.py: fit on this rank's half of the batch."""

import os
import sys

import torch
import torch.distributed as dist

import lazypass
from tests.fitting import class_batches, lively_dit


def main(out_dir: str, steps: int, batch: int) -> None:
    torch.set_num_threads(1)
    model = lazypass.apply(lively_dit())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = batch // world
    sample = class_batches(batch, rows=slice(rank * local, (rank + 1) * local))
    # fit initialises the process group itself (gloo on CPU) when started by torchrun
    lazypass.fit(model, sample, objective="one_step", steps=steps, lr=1e-3, rho=1e-6, num_inference_steps=5, progress=False)
    assert dist.is_initialized() and dist.get_world_size() == world
    lazypass.save_gates(model, f"{out_dir}/rank{rank}.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
