"""moco.py: MoCo-v3 pre-training of a ViT (Chen, Xie & He 2021), the papers' contrastive baseline.

    python moco.py                                  # demo: vit_tiny on synthetic shapes, CPU ok
    torchrun --nproc_per_node 8 moco.py --data imagefolder --data-root /path/to/imagenet \
        --batch-size 128                            # MoCov3-Tiny: 400 epochs, batch 1024

As the papers' code (MAE-Lite's projects/mocov3, after facebookresearch/moco-v3): two augmented
views of each image; q = predictor(projector(encoder(view))), k = the momentum copy of encoder +
projector; a symmetric InfoNCE loss whose negatives are the keys of the whole global batch,
scaled by 2 * temperature; the momentum follows a cosine from 0.99 to 1 over the run. The
checkpoint's `model` is the plain backbone (FAIR/timm ViT keys), so finetune.py --init,
analyze.py and mae.py --teacher read it unchanged; the rest (projector, predictor, momentum
copies) is kept under `moco` for --resume.
"""
import argparse
import copy
import math
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import augment
import dali_loader
import data
import loop
import plumbing
import probe
from checkpoints import CheckpointError
from model import PRESETS
from presets import build_model

# ----------------------------------------------------------------------------------------------
# The model


def mlp(num_layers, in_dim, hidden_dim, out_dim):
    """MoCo-v3's projector / predictor: Linear (no bias) + BatchNorm + ReLU for every layer but
    the last, which ends in a BatchNorm without affine parameters (its ViT heads keep it)."""
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim,
                                bias=False))
        layers.append(nn.BatchNorm1d(out_dim, affine=False) if last else
                      nn.BatchNorm1d(hidden_dim))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def init_like_mocov3(vit):
    """MoCo-v3's ViT initialisation: xavier-uniform Linears with q, k and v bounded as three
    separate matrices, zero biases, a uniform patch projection of fan-in C * p * p, cls token
    N(0, 1e-6); the sin-cos position embedding stays fixed."""
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    proj = vit.patch_embed.proj
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + vit.embed_dim))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)


def concat_all_gather(x):
    """(B, D) on every process -> (world * B, D) in rank order (no gradient: keys only)."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def contrastive_loss(q, k, temperature):
    """InfoNCE of queries q (B, D) against the keys of the whole global batch: the positive of
    query i is key i of this process, every other key a negative; scaled by 2 * temperature as
    the reference (so the loss does not grow as the temperature falls)."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(concat_all_gather(k.float()), dim=1)  # (world * B, D)
    logits = q @ k.T / temperature  # (B, world * B)
    rank = dist.get_rank() if dist.is_initialized() else 0
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2 * temperature)


def momentum_at(step, total_steps, base=0.99):
    """The momentum coefficient of step `step`: a half cosine from `base` (step 0) to 1 (the
    end), per iteration as the reference."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / total_steps)) * (1.0 - base)


class MoCo(nn.Module):
    """encoder + projector (trained) and their momentum copies (EMA), predictor (trained)."""

    def __init__(self, encoder, out_dim=256, mlp_dim=4096, temperature=0.2):
        super().__init__()
        self.temperature = temperature
        self.encoder = encoder  # a ViT with num_classes=0: its normalised cls token (B, D)
        self.projector = mlp(3, encoder.embed_dim, mlp_dim, out_dim)
        self.predictor = mlp(2, out_dim, mlp_dim, out_dim)
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    @torch.no_grad()
    def update_momentum(self, m):
        """momentum weights <- m * momentum weights + (1 - m) * current weights (parameters
        only; each BatchNorm keeps its own running statistics)."""
        pairs = [(self.momentum_encoder, self.encoder), (self.momentum_projector, self.projector)]
        for target, source in pairs:
            for t, s in zip(target.parameters(), source.parameters()):
                t.mul_(m).add_(s.detach(), alpha=1.0 - m)

    def forward(self, x1, x2):
        """Two views (B, C, H, W) of the same images -> {"loss"}. The training loop moves the
        momentum copies (update_momentum) before each step's forward, towards the weights of the
        last optimizer step, as the reference does inside its forward."""
        q1 = self.predictor(self.projector(self.encoder(x1)))  # (B, out_dim)
        q2 = self.predictor(self.projector(self.encoder(x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_encoder(x1))
            k2 = self.momentum_projector(self.momentum_encoder(x2))
        loss = contrastive_loss(q1, k2, self.temperature) + \
            contrastive_loss(q2, k1, self.temperature)
        return {"loss": loss}


# ----------------------------------------------------------------------------------------------
# The two views


# ----------------------------------------------------------------------------------------------
# Command line


def get_parser():
    p = argparse.ArgumentParser(description="MoCo-v3 pre-training of a ViT (nanoMIM).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_tiny", choices=sorted(PRESETS), help="encoder")
    p.add_argument("--img-size", type=int, default=224, help="input size (synthetic: 32)")
    p.add_argument("--patch-size", type=int, default=16, help="patch size (synthetic: 4)")
    p.add_argument("--mlp-dim", type=int, default=4096, help="hidden width of both MLP heads")
    p.add_argument("--out-dim", type=int, default=256, help="width of the embeddings compared")
    p.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature")
    p.add_argument("--momentum", type=float, default=0.99,
                   help="momentum at the start; it follows a cosine to 1")
    p.add_argument("--frozen-patch-embed", action="store_true",
                   help="MoCo-v3's random, frozen patch projection (the papers found a learned "
                        "one better for small models)")
    p.add_argument("--data", default="synthetic", choices=data.DATASETS, help="dataset")
    p.add_argument("--data-root", default=None, help="dataset folder")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--min-crop-scale", type=float, default=0.08, help="smallest crop area")
    p.add_argument("--loader", default="pil", choices=["pil", "dali"],
                   help="pil: PIL decode + both views in workers; dali: NVIDIA DALI decodes and "
                        "makes both views (pip install nvidia-dali-cuda130; --data imagefolder "
                        "or folder)")
    p.add_argument("--synthetic-size", type=int, default=2000, help="images in synthetic train")
    p.add_argument("--max-images", type=int, default=None, help="at most this many images")
    p.add_argument("--batch-size", type=int, default=128,
                   help="images per GPU per step (the papers: 1024 = 8 x 128; synthetic: 64)")
    p.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--epochs", type=int, default=400, help="training epochs (synthetic: 8)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear warmup epochs (none given: 10%% of --epochs, 40 of 400)")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr * batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay, on every parameter (as the papers' code)")
    p.add_argument("--clip-grad", type=float, default=None, help="gradient-norm clip (0: off)")
    plumbing.add_run_flags(p, "out/moco")
    probe.add_monitor_flags(p)
    p.add_argument("--save-every", type=int, default=20, help="also keep checkpoint-<epoch>.pth")
    return p


DEMO_DEFAULTS = dict(img_size=32, patch_size=4, batch_size=64, epochs=8, warmup_epochs=1)
RANGES = {**plumbing.RUN_RANGES, "knn_every": "[0, inf)", "knn_images": "[1, inf)",
          "img_size": "[1, inf)", "patch_size": "[1, inf)", "mlp_dim": "[1, inf)",
          "out_dim": "[1, inf)", "temperature": "(0, inf)", "momentum": "[0, 1]",
          "min_crop_scale": "(0, 1]", "synthetic_size": "[1, inf)", "max_images": "[1, inf)",
          "batch_size": "[2, inf)", "accum_iter": "[1, inf)", "epochs": "[1, inf)",
          "blr": "(0, inf)", "lr": "(0, inf)", "min_lr": "[0, inf)", "weight_decay": "[0, inf)",
          "clip_grad": "[0, inf)", "save_every": "[1, inf)"}
# Flags a --resume must share with the run it continues.
ARCH_ARGS = ("model", "img_size", "patch_size", "mlp_dim", "out_dim", "frozen_patch_embed")


def parse_args(argv=None):
    """Flags -> checked args, over the synthetic demo's sizes (plumbing.parse_layered)."""
    parser = get_parser()
    args, _ = plumbing.parse_layered(
        parser, argv, "moco.py",
        lambda given, typed: [DEMO_DEFAULTS] if given.data == "synthetic" else [])
    plumbing.warmup_from_fraction(args, 0.1)
    plumbing.check_ranges(parser, args, RANGES)
    plumbing.check_run_flags(parser, args)
    if args.loader == "dali" and args.data not in ("imagefolder", "folder"):
        parser.error("--loader dali reads image files: use it with --data imagefolder or --data "
                     "folder")
    return args


def build_moco(args):
    """The MoCo module around a freshly initialised (MoCo-v3's init) preset ViT."""
    encoder = build_model(args.model, img_size=args.img_size, patch_size=args.patch_size)
    init_like_mocov3(encoder)
    if args.frozen_patch_embed:
        encoder.patch_embed.requires_grad_(False)
    return MoCo(encoder, args.out_dim, args.mlp_dim, args.temperature)


def train(args):
    rank, world_size, device, precision, use_compile = plumbing.start_run(args)
    is_main = rank == 0
    log, last_path = loop.open_run(args, is_main)
    monitor = probe.knn_monitor(args) if is_main else None
    plumbing.seed_everything(args.seed)
    moco = build_moco(args)
    if dist.is_initialized() and device.type == "cuda":  # BatchNorm over the global batch
        moco = nn.SyncBatchNorm.convert_sync_batchnorm(moco)
    elif dist.is_initialized():
        plumbing.print0("note: SyncBatchNorm needs CUDA; on CPU each process normalises its own "
                        "batch (negatives still come from every process)")
    moco = moco.to(device)
    dataset = data.build_dataset(args.data, args.data_root, "train",
                                 augment.MocoViews(args.img_size, args.min_crop_scale),
                                 args.download, args.synthetic_size, args.img_size)
    dataset = data.evenly_spaced(dataset, args.max_images)
    if args.loader == "dali":  # DALI's two views; MocoViews for what it cannot decode
        run_loader = dali_loader.DaliLoader(
            data.samples_of(dataset), args.batch_size, args.seed, device,
            dali_loader.moco_graph(args.img_size, args.min_crop_scale),
            augment.MocoViews(args.img_size, args.min_crop_scale),
            (2, 3, args.img_size, args.img_size), rank, world_size, args.num_workers)
    else:
        run_loader = data.Loader(dataset, args.batch_size, args.seed, rank=rank,
                                 world_size=world_size, num_workers=args.num_workers,
                                 pin_memory=device.type == "cuda")  # workers live for the run
    steps_per_epoch, eff_batch, lr = plumbing.steps_and_lr(args, len(dataset), world_size,
                                                           lr=args.lr)
    optimizer = torch.optim.AdamW([p for p in moco.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    scaler = plumbing.grad_scaler(precision, device)
    ckpt = loop.load_checkpoint(args.resume, args=args, same_args=ARCH_ARGS) if args.resume \
        else None
    if ckpt is not None:
        moco.load_state_dict(ckpt["moco"])
    start_epoch, step, bad_images = loop.resume_into(ckpt, args.resume, optimizer, scaler,
                                                     args.epochs)
    model = plumbing.wrap_ddp(plumbing.maybe_compile(moco, use_compile), device)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    params = sum(p.numel() for p in moco.encoder.parameters())
    plumbing.print0(f"{args.model} MoCo-v3 | {params / 1e6:.2f}M backbone params | "
                    f"{args.data}: {len(dataset)} images, "
                    f"{args.img_size}px | {device}, {precision}, compile {use_compile}, "
                    f"{plumbing.processes_text(world_size)} | batch {eff_batch}, lr {lr:.2e}, "
                    f"{total_steps} steps")

    losses = loop.LossLog(log, last_path, world_size)
    for epoch in range(start_epoch, args.epochs):
        bar = loop.epoch_batches(run_loader, args, epoch, steps_per_epoch, bad_images, rank)
        steps_before = step
        for it, (views, _) in enumerate(bar):
            if it % args.accum_iter == 0:  # once per optimizer step
                loop.set_lr(optimizer, loop.cosine_lr(step, total_steps, warmup_steps, lr,
                                                      args.min_lr))
                moco.update_momentum(momentum_at(step, total_steps, args.momentum))
            x1, x2 = views.to(device, non_blocking=True).unbind(1)  # (B, C, S, S) each
            with plumbing.autocast(device, precision):
                loss = model(x1, x2)["loss"]
            scaler.scale(loss / args.accum_iter).backward()
            losses.add({"loss": loss}, x1.shape[0])
            if (it + 1) % args.accum_iter:
                continue
            loop.optimizer_step(optimizer, args.clip_grad, scaler)
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                losses.write(step, epoch, optimizer, bar, bad_images,
                             momentum=momentum_at(step, total_steps, args.momentum))
        loop.end_epoch(losses, optimizer, step, steps_before, epoch, bad_images)
        if is_main:
            knn = probe.monitor_epoch(monitor, args, epoch, moco.encoder, device, precision,
                                      log, step)
            state = {"model": moco.encoder.state_dict(), "moco": moco.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch, "step": step, "args": vars(args), **bad_images.state_dict()}
            loop.save_epoch(state, args.out_dir, epoch, args.save_every,
                            final=epoch + 1 == args.epochs)
            plumbing.print0(f"epoch {epoch + 1}/{args.epochs} done, step {step}{knn}, saved "
                            f"{last_path}")
    if is_main and start_epoch < args.epochs:  # else a finished run, resumed: nothing new
        loop.finish_run(args.out_dir, log, step)
    plumbing.cleanup_distributed()


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (data.DataError, CheckpointError, plumbing.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
