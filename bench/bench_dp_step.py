"""Benchmark: a DP-SGD training step against a plain one, for each way of getting per-sample gradients.

The default network (``models.networks`` preset ``default``, tissue protocol) on 96^3 patches, batch 2,
Adam, through ``models.training.training_step`` as a site trains. Every mode of
``privacy.dp_sgd.GRAD_SAMPLE_MODES`` and the plain step run in one process, interleaved round by round so
that load from other processes hits them alike; the printed ratios are medians over the rounds. Peak
memory is measured apart: each mode takes two steps in its own subprocess, whose peak resident set size
(CPU) or peak allocation (CUDA) is its own. Opacus' ``hooks`` mode unfolds convolution inputs; it is
skipped when that alone would need more than ``--max-hooks-gib``. Figures are printed, never asserted.
Usage::

    .venv/bin/python bench/bench_dp_step.py [--patch 96] [--batch 2] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

NUM_CLASSES = 4  # the tissue protocol


def unfolded_conv_inputs_gib(model, batch) -> float:
    """Largest convolution input unfolded as Opacus' ``hooks`` mode does: B x C_in x k^3 x output voxels."""
    import torch

    largest = [0]

    def record(module, inputs, output) -> None:
        kernel = math.prod(module.kernel_size)
        # Transposed convolutions unfold the gradient of their output, which has the output's size.
        channels = module.in_channels if isinstance(module, torch.nn.Conv3d) else module.out_channels
        largest[0] = max(largest[0], output.shape[0] * channels * kernel * math.prod(output.shape[2:]))

    handles = [
        m.register_forward_hook(record)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)
    ]
    with torch.no_grad():
        model(batch)
    for handle in handles:
        handle.remove()
    return largest[0] * 4 / 2**30


def build_steps(args: argparse.Namespace, modes: list[str]) -> tuple[dict[str, Callable[[], float]], str]:
    """One step function per mode (and ``plain``) on the same fixed batch; and the device."""
    import torch
    from torch.utils.data import TensorDataset

    from models.networks import NetworkConfig, build_network
    from models.training import make_loss, training_step
    from privacy.dp_sgd import DPConfig, make_private_training

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, 1, args.patch, args.patch, args.patch)
    images = torch.randn(shape, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, shape, generator=generator)
    batch = (images.to(device), labels.to(device))
    config = NetworkConfig.preset(args.preset, 1, NUM_CLASSES)
    steps: dict[str, Callable[[], float]] = {}
    for mode in modes:
        model = build_network(config, seed=0).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        if mode == "plain":
            loss_fn = make_loss()
            steps[mode] = lambda m=model, o=optimizer, f=loss_fn: training_step(m, batch, f, o)
            continue
        # make_private_training needs data for its Poisson loader; the benchmark feeds the fixed batch.
        private = make_private_training(
            model,
            optimizer,
            TensorDataset(images, labels),
            args.batch,
            DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode),
            loss_fn=make_loss(),
        )
        steps[mode] = lambda p=private: training_step(p.model, batch, p.loss_fn, p.optimizer)
    return steps, device


def _peak_rss_kib() -> float:
    """This process's peak resident set, KiB. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from
    the parent that started this subprocess."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_memory_of(args: argparse.Namespace, mode: str) -> dict:
    """Run two steps of ``mode`` in this process (a subprocess of the benchmark); its peak memory."""
    steps, device = build_steps(args, [mode])
    for _ in range(2):
        steps[mode]()
    result = {"peak_rss_gib": _peak_rss_kib() / 2**20}
    if device == "cuda":
        import torch

        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patch", type=int, default=96, help="patch side, voxels")
    parser.add_argument("--batch", type=int, default=2, help="patches per step")
    parser.add_argument("--preset", default="default", help="network preset (default, tiny)")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per mode (after one warm-up)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--modes", default="vmap,functorch,ghost,hooks", help="DP modes, comma-separated")
    parser.add_argument("--max-hooks-gib", type=float, default=16.0, help="skip hooks mode above this")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-mode memory subprocesses")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: the memory subprocess
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(peak_memory_of(args, args.memory_of)))
        return

    import torch

    from models.networks import NetworkConfig, build_network

    modes = [m for m in args.modes.split(",") if m]
    notes = []
    if "hooks" in modes:
        model = build_network(NetworkConfig.preset(args.preset, 1, NUM_CLASSES), seed=0)
        need = unfolded_conv_inputs_gib(model, torch.zeros(args.batch, 1, args.patch, args.patch, args.patch))
        if need > args.max_hooks_gib:
            modes.remove("hooks")
            notes.append(f"hooks skipped: its largest unfolded convolution input alone is {need:.1f} GiB")
        else:
            notes.append(f"hooks: largest unfolded convolution input {need:.2f} GiB")

    started = time.perf_counter()
    steps, device = build_steps(args, ["plain", *modes])
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up: allocator, oneDNN kernels
        step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - t_wall)
            cpu[name].append(time.process_time() - t_cpu)
    del steps

    memory: dict[str, dict] = {}
    if not args.no_memory:
        forwarded = [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k in ("patch", "batch", "preset", "threads", "device") and v is not None
        ]
        for name in wall:
            out = subprocess.run(
                [sys.executable, __file__, f"--memory-of={name}", *forwarded], capture_output=True, text=True
            )
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}

    plain_wall, plain_cpu = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    print(
        f"DP step vs plain step: network preset {args.preset!r}, patch {args.patch}^3, batch {args.batch}, "
        f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}; medians of {args.rounds} steps"
    )
    key = "peak_cuda_gib" if device == "cuda" else "peak_rss_gib"
    print(f"{'mode':<10} {'wall s':>8} {'x plain':>8} {'CPU s':>8} {'x plain':>8} {'peak GiB':>9}")
    for name in wall:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        peak = memory.get(name, {}).get(key, math.nan)
        print(f"{name:<10} {w:8.2f} {w / plain_wall:8.2f} {c:8.2f} {c / plain_cpu:8.2f} {peak:9.2f}")
    print(
        "CPU s: process CPU time (all threads). peak GiB: "
        + ("peak CUDA allocation" if device == "cuda" else "peak resident set of a process taking 2 steps")
    )
    for note in notes:
        print(note)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
