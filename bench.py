"""bench.py: how fast nanoMIM's steps and input pipeline run, measured on this machine.

    python bench.py                     # CUDA: 224 px, batch 256; CPU: small sizes, ~2 minutes
                                        # (+ ~75 s for the Fashion-MNIST epoch row on 2 cores)
    python bench.py --benches mae,mae_timm --compile on --precision bf16 --out bench.json

Model steps (synthetic inputs, warm-up excluded, CUDA-synchronised, median of --repeats runs of
--steps steps), for each --compile x --precision setting:
  mae          the MAE pre-training step of vit_tiny (mask 0.75, the MAE-Tiny decoder) + AdamW
  mae_distill  the same with attention distillation from a frozen vit_base teacher (D-MAE)
  finetune     the fine-tuning step of vit_tiny (1000 classes, mean pooling) + AdamW
  infer        vit_tiny classification, forward only
  mae_timm     the MAE step with timm's VisionTransformer Blocks (12 heads) in encoder and
               decoder, as the published MAE / MAE-Lite code is built (needs timm)
  mae_timm_nofused  the same with timm's fused attention off, as the timm 0.3.2 those repos pin
FLOPs per image (count_flops): FlopCounterMode on the CPU with attention counted by formula,
2 per multiply-add; MFU divides achieved FLOP/s by --peak-tflops. The input pipeline (--jpegs N)
and a Fashion-MNIST epoch (--small-images N) are timed by bench_data.py.
"""
import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import distill
import loop
import plumbing
from bench_data import bench_loaders, bench_small_epoch, sync
from presets import build_mae, build_model

BENCHES = ("mae", "mae_distill", "finetune", "infer", "mae_timm", "mae_timm_nofused")


# ----------------------------------------------------------------------------------------------
# The steps being timed


class TimmBlock(nn.Module):
    """timm's Block behind our Block's interface (x -> (x, None)), for the baseline."""

    def __init__(self, dim, heads, fused):
        super().__init__()
        from functools import partial

        from timm.models.vision_transformer import Block

        self.block = Block(dim, heads, mlp_ratio=4.0, qkv_bias=True,
                           norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.block.attn.fused_attn = fused

    def forward(self, x, return_logits=False):
        return self.block(x), None


def timm_mae(args, fused):
    """Our MAE (FAIR's masking, decoder and loss) with every encoder and decoder block replaced
    by timm's; the patch embedding and linear layers are the same as FAIR's."""
    model = build_mae("vit_tiny", img_size=args.img_size, patch_size=args.patch_size)
    model.blocks = nn.ModuleList(TimmBlock(192, 12, fused) for _ in range(model.depth))
    model.decoder_blocks = nn.ModuleList(TimmBlock(96, 3, fused) for _ in model.decoder_blocks)
    return model


def build_bench(name, args, device):
    """(module to compile, loss function of (compiled module, images), trains?)."""
    size = dict(img_size=args.img_size, patch_size=args.patch_size)
    if name in ("mae", "mae_timm", "mae_timm_nofused"):
        model = build_mae("vit_tiny", **size) if name == "mae" else \
            timm_mae(args, fused=name == "mae_timm")
        return model.to(device), lambda m, x: m(x, 0.75)["loss"], True
    if name == "mae_distill":
        student = build_mae("vit_tiny", **size)
        teacher = build_model("vit_base", **size).requires_grad_(False).eval()
        model = distill.DistilledMAE(student, teacher, [12], [12], "attn")
        return model.to(device), lambda m, x: m(x, 0.75)["loss"], True
    model = build_model("vit_tiny", num_classes=1000, global_pool="avg", **size).to(device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    if name == "finetune":
        return model, lambda m, x: F.cross_entropy(m(x).float(), labels), True
    return model.eval(), lambda m, x: m(x), False


def make_step(module, loss_fn, trains, images, precision, use_compile, device, mode=None):
    compiled = plumbing.maybe_compile(module, use_compile, mode)
    # CUDA graphs (modes "reduce-overhead" and "max-autotune") replay into the same output
    # memory: each step says where it begins, so a replay never overwrites outputs the previous
    # step still reads
    graphs = use_compile and mode in ("reduce-overhead", "max-autotune")
    begin = torch.compiler.cudagraph_mark_step_begin if graphs else (lambda: None)
    if not trains:
        def step():
            begin()
            with torch.no_grad(), plumbing.autocast(device, precision):
                compiled(images)
        return step
    optimizer = torch.optim.AdamW(loop.param_groups(module, 0.05), lr=1e-4,
                                  betas=(0.9, 0.95), fused=device.type == "cuda")

    def step():
        begin()
        with plumbing.autocast(device, precision):
            loss = loss_fn(compiled, images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """Model FLOPs of scaled_dot_product_attention's forward, 2 per multiply-add: q k^T is
    B H N M d, (softmax) v is B H N M d_v. torch's FlopCounterMode has this formula for the CUDA
    kernels but none for the CPU one, which it counted as 0."""
    *batch, n, d = query_shape  # (B, heads, N, d)
    m = key_shape[-2]
    return 2 * math.prod(batch) * n * m * (d + value_shape[-1])


def sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                        out_shape=None, **kwargs):
    """The backward's four products (dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q): twice
    the forward, as for any matmul (a kernel's recomputation of q k^T is not model FLOPs)."""
    return 2 * sdpa_flops(query_shape, key_shape, value_shape)


# The CPU SDPA kernel and its backward, which FlopCounterMode does not know
SDPA_CPU_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                      sdpa_backward_flops}
FLOP_COUNT_BATCH = 2  # images a count runs on; model FLOPs grow linearly with the batch


def count_flops(name, args):
    """Model FLOPs per image of one step of bench `name` (forward + backward when it trains),
    counted the same way on every machine: by FlopCounterMode, on the CPU, eager, fp32, on
    FLOP_COUNT_BATCH images of --img-size, with the CPU SDPA kernel counted by formula; 2 per
    multiply-add of every matmul and convolution, only the tokens actually processed."""
    from torch.utils.flop_counter import FlopCounterMode

    cpu = torch.device("cpu")
    small = argparse.Namespace(**{**vars(args), "batch_size": FLOP_COUNT_BATCH})
    module, loss_fn, trains = build_bench(name, small, cpu)
    images = torch.randn(FLOP_COUNT_BATCH, 3, args.img_size, args.img_size)
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS)
    with counter:
        if trains:
            loss_fn(module, images).backward()
        else:
            with torch.no_grad():
                module(images)
    return counter.get_total_flops() / FLOP_COUNT_BATCH


def time_step(step, args, device, compiled=False):
    """Median seconds per step over --repeats runs of --steps steps, after --warmup steps (and
    3 more when compiled: the first calls compile, and a guard may recompile once)."""
    for _ in range(args.warmup + (3 if compiled else 0)):
        step()
    sync(device)
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        runs.append((time.perf_counter() - start) / args.steps)
    return statistics.median(runs)


def bench_models(args, device):
    rows = []
    kept_steps = {}
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    # Warm the process up (allocator, thread pools, CUDA context and kernels) on a throwaway
    # MAE, so the first bench timed does not pay for it: measured on CPU, the first of two
    # identical benches was ~20% slower without this.
    module, loss_fn, trains = build_bench("mae", args, device)
    step = make_step(module, loss_fn, trains, images, args.precision[0], False, device)
    for _ in range(3 * args.warmup + 2):
        step()
    sync(device)
    del module, step
    for name in args.benches:
        if name.startswith("mae_timm"):
            try:
                import timm  # noqa: F401
            except ImportError:
                print(f"skipping {name}: timm is not installed (pip install timm)")
                continue
        flops = count_flops(name, args) * args.batch_size  # of one step
        module, loss_fn, trains = build_bench(name, args, device)
        keep = name in ("mae", "mae_timm", "mae_timm_nofused")  # for the paired ratio below
        for use_compile in args.compile:
            for precision in args.precision:
                torch.manual_seed(0)
                step = make_step(module, loss_fn, trains, images, precision, use_compile, device,
                                 args.compile_mode)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = time_step(step, args, device, use_compile)
                peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 \
                    if device.type == "cuda" else None
                achieved = flops / seconds / 1e12  # TFLOP/s
                rows.append(dict(bench=name, compile=use_compile,
                                 compile_mode=args.compile_mode if use_compile else None,
                                 precision=precision,
                                 batch=args.batch_size, ms_per_step=seconds * 1e3,
                                 images_per_s=args.batch_size / seconds, peak_mib=peak,
                                 gflop_per_image=flops / args.batch_size / 1e9,
                                 tflops=achieved,
                                 mfu=achieved / args.peak_tflops if device.type == "cuda"
                                 else None))
                print(f"  {name} compile={use_compile} {precision}: "
                      f"{rows[-1]['images_per_s']:.0f} images/s", flush=True)
                save(args, device, rows, loader_rows=[])  # row by row: a stopped run keeps them
                if keep:
                    kept_steps[(name, use_compile, precision)] = step
        del module
    for row in rows:  # our MAE step against the timm-based one, same setting, paired
        for base in ("mae_timm", "mae_timm_nofused"):
            setting = (row["compile"], row["precision"])
            if row["bench"] == "mae" and (base, *setting) in kept_steps:
                row[f"vs_{base}"] = paired_speedup(kept_steps[("mae", *setting)],
                                                   kept_steps[(base, *setting)], args, device)
    return rows


def paired_speedup(ours, baseline, args, device):
    """Median over --repeats of (baseline time / our time), the two timed back to back in each
    repeat, so that drifts of a shared machine cancel (separate runs differ by up to ~20% on
    CPU)."""
    ratios = []
    for _ in range(args.repeats):
        times = []
        for step in (ours, baseline):
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            times.append(time.perf_counter() - start)
        ratios.append(times[1] / times[0])
    return statistics.median(ratios)


# ----------------------------------------------------------------------------------------------
# The input pipeline


# ----------------------------------------------------------------------------------------------
# Command line


def print_table(rows, loader_rows, device, small_rows=()):
    print(f"\n{'bench':<17}{'compile':>8}{'prec':>6}{'batch':>6}{'ms/step':>10}{'img/s':>10}"
          f"{'peak MiB':>10}{'GFLOP/img':>10}{'TFLOP/s':>9}{'MFU':>7}  vs timm (no fused attn)")
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ratio = f"{r['vs_mae_timm']:.2f}x" if "vs_mae_timm" in r else ""
        if "vs_mae_timm_nofused" in r:
            ratio += f" ({r['vs_mae_timm_nofused']:.2f}x)"
        print(f"{r['bench']:<17}{str(r['compile']):>8}{r['precision']:>6}{r['batch']:>6}"
              f"{r['ms_per_step']:>10.2f}{r['images_per_s']:>10.0f}{peak:>10}"
              f"{r['gflop_per_image']:>10.3f}{r['tflops']:>9.2f}{mfu:>7}  {ratio}")
    for r in loader_rows:
        print(f"input pipeline {r['loader']:<7} {r['workers']} workers, {r['img_size']} px: "
              f"{r['images_per_s']:.0f} images/s over the pass, "
              + (f"{r['steady_images_per_s']:.0f} after the first {r['fill_batches']} batches"
                 if r["steady_images_per_s"] else "no steady rate")
              + f" ({r['images']} JPEGs of 500x375)")
    for r in small_rows:
        print(f"fine-tuning epoch, Fashion-MNIST ({r['images']} images, {r['img_size']} px, "
              f"patch {r['patch_size']}, batch {r['batch']}, {r['workers']} workers, "
              f"{r['precision']}, loader included): {r['epoch_s']:.1f} s, "
              f"{r['images_per_s']:.0f} images/s ({r['first_epoch_s']:.1f} s the first epoch); "
              f"evaluation of {r['val_images']} images {r['eval_s']:.1f} s "
              f"({r['first_eval_s']:.1f} s the first)")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores")


def get_parser():
    p = argparse.ArgumentParser(description="Benchmark nanoMIM's training steps and loaders.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--benches", default=",".join(BENCHES),
                   help="comma list of " + ", ".join(BENCHES))
    p.add_argument("--img-size", type=int, default=None, help="default 224 on CUDA, 64 on CPU")
    p.add_argument("--patch-size", type=int, default=None, help="default 16 on CUDA, 8 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    p.add_argument("--steps", type=int, default=None, help="steps per timed run (CUDA 20, CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (CUDA 10, CPU 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--compile", default=None, choices=["off", "on", "both"],
                   help="torch.compile setting(s) (default: both on CUDA, off on CPU)")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode for the compiled rows (reduce-overhead: CUDA "
                        "graphs, for a step that waits on kernel launches; default: torch's; "
                        "needs --compile on or both)")
    p.add_argument("--precision", default="both", choices=["fp32", "bf16", "both"],
                   help="fp32, bf16 autocast, or both, one row each")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak for MFU (H100 SXM: 989)")
    p.add_argument("--jpegs", type=int, default=None,
                   help="JPEGs for the input-pipeline bench (default 2000 CUDA, 200 CPU; 0: skip)")
    p.add_argument("--loader-batch", type=int, default=256, help="batch of the loader bench")
    p.add_argument("--workers", type=int, default=None,
                   help="loader worker processes (default: all CPU cores, at most 16)")
    p.add_argument("--small-images", type=int, default=5000,
                   help="training images of the Fashion-MNIST fine-tuning epoch row, 1/10 of "
                        "them a class (the study's 5,000; 0: skip the row)")
    p.add_argument("--small-batch", type=int, default=128, help="batch of that row")
    p.add_argument("--small-data-root", default=data.FASHION_MNIST_DIR,
                   help="folder of Fashion-MNIST's IDX files for that row")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p


RANGES = {"img_size": "[1, inf)", "patch_size": "[1, inf)", "batch_size": "[1, inf)",
          "steps": "[1, inf)", "warmup": "[0, inf)", "repeats": "[1, inf)",
          "peak_tflops": "(0, inf)", "jpegs": "[0, inf)", "loader_batch": "[1, inf)",
          "workers": "[0, inf)", "small_images": "[0, inf)", "small_batch": "[1, inf)"}


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    device = plumbing.default_device()
    cuda = device.type == "cuda"
    for name, gpu, cpu in (("img_size", 224, 64), ("patch_size", 16, 8), ("batch_size", 256, 16),
                           ("steps", 20, 3), ("warmup", 10, 1), ("jpegs", 2000, 200)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    args.workers = min(16, os.cpu_count() or 1) if args.workers is None else args.workers
    plumbing.check_ranges(parser, args, RANGES)
    if args.img_size % args.patch_size:
        parser.error(f"--img-size {args.img_size} is not a multiple of --patch-size "
                     f"{args.patch_size}")
    args.compile = {"off": [False], "on": [True], "both": [False, True]}[
        args.compile or ("both" if cuda else "off")]
    if args.compile_mode and args.compile == [False]:
        parser.error(f"--compile-mode {args.compile_mode} needs compiled rows: add --compile on")
    args.precision = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    args.benches = [b for b in args.benches.split(",") if b]
    unknown = [b for b in args.benches if b not in BENCHES]
    if not args.benches:
        parser.error(f"--benches names no bench: give a comma list of {', '.join(BENCHES)}")
    if args.out and os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a folder: give the JSON file to write")
    if args.out:
        plumbing.check_out_dir(parser, os.path.dirname(args.out) or ".", "--out's folder")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    if args.small_images > 0 and args.small_data_root != data.FASHION_MNIST_DIR:
        try:  # a folder asked for must hold the set; the default may be absent (row skipped)
            data.FashionMNIST(args.small_data_root, "train")
        except data.DataError as e:
            parser.error(f"--small-data-root: {e}")
    if unknown:
        raise SystemExit(f"error: unknown bench {', '.join(unknown)}; choose from "
                         f"{', '.join(BENCHES)}")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    print(f"benchmarking on {device}: {args.img_size} px, patch {args.patch_size}, batch "
          f"{args.batch_size}, {args.steps} steps x {args.repeats} repeats"
          + (f", compile mode {args.compile_mode}" if args.compile_mode else ""), flush=True)
    rows = bench_models(args, device)
    loader_rows = bench_loaders(args, device) if args.jpegs > 0 else []
    small_rows = []
    if args.small_images > 0:
        try:
            small_rows = bench_small_epoch(args, device)
        except data.DataError as e:
            print(f"skipping the Fashion-MNIST epoch row ({e}); set --small-data-root and "
                  "--small-images (0: skip it)")
    print_table(rows, loader_rows, device, small_rows)
    save(args, device, rows, loader_rows, small_rows)
    return rows, loader_rows, small_rows


def save(args, device, rows, loader_rows, small_rows=()):
    """Write the results so far to --out (if given), atomically."""
    if not args.out:
        return
    with open(args.out + ".tmp", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else str(device), "torch": torch.__version__, "args": vars(args), "steps": rows,
                   "loaders": loader_rows, "small_data": list(small_rows)}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
