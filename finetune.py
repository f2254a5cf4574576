"""finetune.py: fine-tuning, transfer, linear probing and the reserved-blocks study.

    python finetune.py --init out/mae/checkpoint.pth                 # demo: synthetic, CPU ok
    python finetune.py --init mae_tiny.pth --data imagefolder --data-root /imagenet   # impr
    python finetune.py --init ckpt.pth --recipe transfer --data flowers102 --data-root ~/data \
        --lr 0.01,0.03,0.1                                          # one run per lr, a table
    python finetune.py --init ckpt.pth --recipe linprobe ...        # frozen backbone
    python finetune.py --init out/ft/best.pth --eval                # evaluate only
    python finetune.py --init out/ft/best.pth --export vit_tiny_timm.pth   # plain state dict

--init takes our pre-training or fine-tuning checkpoints, FAIR MAE, MAE-Lite and timm files (the
loader in model.py reports what it loaded, dropped and initialised), or nothing (from scratch).
A recipe is a set of defaults (RECIPES below); every flag overrides its entry.
"""
import argparse
import copy
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import torchvision.transforms.v2 as v2
from PIL import Image
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

import data
import plumbing
from model import (HIERA_CONFIGS, PRESETS, VIT_CONFIGS, CheckpointError, build_model,
                   load_pretrained, read_state_dict)

# The papers' recipes. Batch sizes are per process; lr = blr * (batch * accum * GPUs) / 256, so
# the published batch (1024 for impr/mae) is e.g. --batch-size 256 on 4 GPUs or --accum-iter 4.
RECIPES = {
    # 000 Tab. A1 / 003 Tab. S1: the improved ViT-Tiny recipe. Colour jitter 0.3 is listed, but
    # timm's transform (which the papers' code calls) skips it when RandAugment is on; so do we.
    # MAE-Lite fine-tunes timm's ViT: every Linear, the head included, starts trunc-normal 0.02.
    "impr": dict(opt="adamw", blr=1e-3, weight_decay=0.05, layer_decay=0.85, epochs=300,
                 warmup_epochs=5, min_lr=1e-6, batch_size=256, rand_aug=10, rand_aug_std=0.5,
                 color_jitter=0.3, mixup=0.2, cutmix=0.0, smoothing=0.0, drop_path=0.0,
                 reprob=0.0, global_pool="avg", clip_grad=None, head_init_std=0.02),
    # FAIR MAE's fine-tuning defaults (main_finetune.py with its ViT-B command line).
    # FAIR re-initialises the head with std 2e-5 (main_finetune.py).
    "mae": dict(opt="adamw", blr=5e-4, weight_decay=0.05, layer_decay=0.65, epochs=100,
                warmup_epochs=5, min_lr=1e-6, batch_size=128, rand_aug=9, rand_aug_std=0.5,
                color_jitter=0.0, mixup=0.8, cutmix=1.0, smoothing=0.1, drop_path=0.1,
                reprob=0.25, global_pool="avg", clip_grad=None, head_init_std=2e-5),
    # 000 Tab. A3 / 003 Tab. S2: small datasets. MAE-Lite's finetuning_transfer_exp.py:
    # Nesterov SGD (momentum 0.9), gradient norm clipped at 1.0, min lr 1e-6, layer decay 0.75
    # (the papers' sweep also tries 1.0); absolute lr swept (--lr 0.01,0.03,0.1); epochs and
    # warmup per dataset from the table (e.g. Flowers 150/30, Cars 50/10).
    "transfer": dict(opt="sgd", lr="0.01,0.03,0.1", weight_decay=0.0, layer_decay=0.75,
                     epochs=100, warmup_epochs=20, min_lr=1e-6, batch_size=512, rand_aug=0,
                     rand_aug_std=0.0, color_jitter=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0,
                     drop_path=0.0, reprob=0.0, global_pool="avg", clip_grad=1.0,
                     head_init_std=0.02),
    # FAIR MAE's linear probing: frozen backbone, BatchNorm1d(affine=False) + Linear, LARS.
    "linprobe": dict(opt="lars", blr=0.1, weight_decay=0.0, layer_decay=1.0, epochs=90,
                     warmup_epochs=10, min_lr=0.0, batch_size=1024, rand_aug=0, rand_aug_std=0.0,
                     color_jitter=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, drop_path=0.0,
                     reprob=0.0, global_pool="token", clip_grad=None, head_init_std=0.01),
}
# Smaller settings when --data synthetic (the CPU demo and the tests).
SYNTHETIC = dict(img_size=32, patch_size=4, batch_size=64, epochs=10, warmup_epochs=1)
# Flags a --resume must share with the run it continues.
ARCH_ARGS = ("model", "img_size", "patch_size", "global_pool", "rel_pos", "recipe", "data")


# ----------------------------------------------------------------------------------------------
# Model surgery: heads, reserved blocks, layer-wise lr decay


def layer_id(name, depth):
    """MAE/BEiT layer of a parameter: patch embedding, cls token, position embedding are layer 0,
    block i (0-indexed) is layer i + 1, everything after the blocks is layer depth + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_scale(name, depth, decay):
    """lr scale decay^(depth + 1 - layer): the head trains at the full lr, the stem the least."""
    return decay ** (depth + 1 - layer_id(name, depth))


def reinit_blocks(model, fresh, keep):
    """Keep blocks 1..keep (1-indexed) as loaded; the rest take the weights of `fresh`, the
    same model before loading (so they are initialised exactly as training from scratch)."""
    for block, new in zip(model.blocks[keep:], fresh.blocks[keep:]):
        block.load_state_dict(new.state_dict())


def build_classifier(args, num_classes):
    """The ViT or Hiera to train. linprobe: the head is BatchNorm1d(affine=False) + Linear and
    nothing else trains (FAIR MAE). Fine-tuning trains the ViT's position embedding too, as
    FAIR's fine-tuning (where it is an ordinary timm parameter)."""
    if args.model in HIERA_CONFIGS:  # mean-pooled, no cls token, no relative positions
        model = build_model(args.model, img_size=args.img_size, num_classes=num_classes,
                            drop_path_rate=args.drop_path)
    else:
        model = build_model(args.model, img_size=args.img_size, patch_size=args.patch_size,
                            num_classes=num_classes, global_pool=args.global_pool,
                            drop_path_rate=args.drop_path, rel_pos=args.rel_pos)
    if args.recipe == "linprobe":
        model.head = nn.Sequential(nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6),
                                   nn.Linear(model.num_features, num_classes))
    return model


def init_head(model, linprobe, std):
    """Trunc-normal head weights of the recipe's std (timm / MAE-Lite 0.02, FAIR MAE 2e-5,
    linear probing 0.01), zero bias."""
    linear = model.head[1] if linprobe else getattr(model.head, "projection", model.head)
    nn.init.trunc_normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)


def init_like_timm(model):
    """timm's ViT initialisation, which the papers' from-scratch baselines get (MAE-Lite and
    FAIR fine-tune timm's VisionTransformer): trunc-normal std 0.02 for every Linear (the head
    included), for cls_token and for pos_embed (a learned, random position embedding), zero
    biases, LayerNorm 1 / 0, PyTorch's default init for the patch-embedding conv."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    model.patch_embed.proj.reset_parameters()
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    nn.init.trunc_normal_(model.pos_embed, std=0.02)


def freeze_backbone(model):
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))


# ----------------------------------------------------------------------------------------------
# Data: augmentation, mixup / cutmix, evaluation


# RandAugment as the papers' fine-tuning code calls it: timm's "rand-m10-mstd0.5-inc1" (impr)
# or "rand-m9-mstd0.5-inc1" (FAIR's mae recipe). The "increasing" op set (no Identity; Invert
# and SolarizeAdd in), each op's strength growing with the level on a 0-10 scale.
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
            "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
            "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
            "TranslateYRel")
MEAN_PIXEL = tuple(round(255 * m) for m in data.IMAGENET_MEAN)  # (124, 116, 104): timm's fill


def rand_op(img, name, level, sign=1.0, resample=Image.BICUBIC, fill=MEAN_PIXEL):
    """One op of RAND_OPS on an RGB PIL image at `level` in [0, 10] (timm's level-to-argument
    maps), `sign` +1 or -1 for the ops that have a direction. Shears and translations call PIL's
    affine transform with timm's matrix (about the top-left corner); torchvision's affine would
    rebuild it from angles and differ in the last bit."""
    m = level / 10
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Equalize":
        return TF.equalize(img)
    if name == "Invert":
        return TF.invert(img)
    if name == "Rotate":  # about the centre, up to 30 degrees
        return TF.rotate(img, sign * m * 30, resample, fill=fill)  # Pillow's constant is accepted
    if name == "PosterizeIncreasing":  # keep 4 .. 0 bits; 0 bits is black, as the Pillow of the papers did
        bits = 4 - int(m * 4)
        return TF.posterize(img, bits) if bits > 0 else Image.new(img.mode, img.size)
    if name == "SolarizeIncreasing":  # invert pixels >= 256 .. 0
        return TF.solarize(img, 256 - min(256, int(m * 256)))
    if name == "SolarizeAdd":  # add up to 110 to pixels below 128
        add = min(128, int(m * 110))
        return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
    factor = max(0.1, 1.0 + sign * m * 0.9)  # the enhance ops: factor in [0.1, 1.9]
    enhance = {"ColorIncreasing": TF.adjust_saturation, "ContrastIncreasing": TF.adjust_contrast,
               "BrightnessIncreasing": TF.adjust_brightness,
               "SharpnessIncreasing": TF.adjust_sharpness}
    if name in enhance:
        return enhance[name](img, factor)
    shift = sign * m * 0.45  # translations: up to 45% of the side
    matrix = {"ShearX": (1, sign * m * 0.3, 0, 0, 1, 0), "ShearY": (1, 0, 0, sign * m * 0.3, 1, 0),
              "TranslateXRel": (1, 0, shift * img.size[0], 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, shift * img.size[1])}[name]
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


class RandAugment:
    """timm's RandAugment (rand-m{magnitude}-mstd{std}-inc1) on PIL images: num_ops ops drawn
    with replacement from RAND_OPS, each applied with probability `prob`, each with its own
    level drawn from N(magnitude, std) and clipped to [0, 10], and its own random sign; fill is
    the mean pixel, resampling bicubic. About 1 op per image on average (2 x 0.5)."""

    def __init__(self, magnitude=10, std=0.5, num_ops=2, prob=0.5):
        self.magnitude = magnitude
        self.std = std
        self.num_ops = num_ops
        self.prob = prob

    def __call__(self, img):
        for index in torch.randint(len(RAND_OPS), (self.num_ops,)).tolist():
            if torch.rand(()).item() >= self.prob:
                continue
            level = self.magnitude + self.std * torch.randn(()).item()
            sign = -1.0 if torch.rand(()).item() < 0.5 else 1.0
            img = rand_op(img, RAND_OPS[index], min(10.0, max(0.0, level)), sign)
        return img


def train_transform(args):
    """RandomResizedCrop (min_crop_scale-1, bicubic) + flip, then RandAugment or colour jitter, normalise,
    random erasing (timm's per-pixel noise)."""
    steps = [v2.RandomResizedCrop(args.img_size, scale=(args.min_crop_scale, 1.0),
                                  interpolation=InterpolationMode.BICUBIC, antialias=True),
             v2.RandomHorizontalFlip()]
    if args.rand_aug > 0:
        steps.append(RandAugment(args.rand_aug, args.rand_aug_std))
    elif args.color_jitter > 0:
        steps.append(v2.ColorJitter(*(3 * [args.color_jitter])))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)]
    if args.reprob > 0:
        steps.append(T.RandomErasing(p=args.reprob, value="random"))
    return v2.Compose(steps)


def build_mixing(args, num_classes):
    """Batch-level MixUp / CutMix (torchvision v2), switched with probability 0.5 when both are
    on, as timm; returns None when both are off. Targets become class probabilities."""
    mixers = []
    if args.mixup > 0:
        mixers.append(v2.MixUp(alpha=args.mixup, num_classes=num_classes))
    if args.cutmix > 0:
        mixers.append(v2.CutMix(alpha=args.cutmix, num_classes=num_classes))
    return (v2.RandomChoice(mixers) if len(mixers) > 1 else mixers[0]) if mixers else None


def limit(dataset, max_images):
    """At most max_images samples, evenly spaced over the dataset (classes stay balanced)."""
    if max_images is None or max_images >= len(dataset):
        return dataset
    step = len(dataset) / max_images
    return torch.utils.data.Subset(dataset, [int(i * step) for i in range(max_images)])


def num_classes_of(args, dataset):
    raw = getattr(dataset, "dataset", dataset).raw  # under a Subset or not
    return len(raw.classes) if hasattr(raw, "classes") and args.data == "imagefolder" \
        else data.NUM_CLASSES[args.data]


@torch.no_grad()
def evaluate(model, loader, device, precision):
    """Top-1 / top-5 accuracy (%) and mean cross-entropy, summed over all processes."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top-1, top-5, images
    for imgs, labels, _ in loader:
        if imgs is None:
            continue
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with plumbing.autocast(device, precision):
            logits = model(imgs).float()  # (B, classes)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
        hit = top == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hit[:, 0].sum().double(), hit.any(1).sum().double(),
                             torch.tensor(float(len(labels)), device=device, dtype=torch.float64)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1),
            "val_loss": loss / max(n, 1), "images": int(n)}


# ----------------------------------------------------------------------------------------------
# LARS, for linear probing (FAIR MAE's optimizer there)


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each matrix is scaled by the trust ratio
    eta * ||w|| / ||g + wd * w||; 1-D parameters (biases) get plain SGD, as FAIR's LARS."""

    def __init__(self, params, lr=0.1, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=g["weight_decay"])
                    w_norm, u_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0),
                                        g["trust_coefficient"] * w_norm / u_norm, 1.0)
                    update = update * trust
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(update)
                p.add_(buf, alpha=-g["lr"])


def build_optimizer(args, model, lr, device):
    decay = (lambda name: layer_decay_scale(name, model.depth, args.layer_decay)) \
        if args.layer_decay != 1.0 else None
    groups = plumbing.param_groups(model, args.weight_decay, decay,
                                   no_decay_names=("cls_token", "pos_embed"))  # timm's
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    if args.opt == "sgd":  # Nesterov, as MAE-Lite's transfer code
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return LARS(groups, lr=lr, weight_decay=args.weight_decay)


# ----------------------------------------------------------------------------------------------
# Command line


def get_parser():
    p = argparse.ArgumentParser(description="Fine-tune, transfer or linearly probe a ViT.")
    p.add_argument("--init", default=None,
                   help="checkpoint to start from (ours, FAIR MAE, MAE-Lite, timm); none: scratch")
    p.add_argument("--recipe", default="impr", choices=sorted(RECIPES),
                   help="set of defaults: impr (papers), mae (FAIR), transfer, linprobe")
    p.add_argument("--model", default=None, choices=sorted(PRESETS) + sorted(HIERA_CONFIGS),
                   help="architecture (default: the --init checkpoint's, else vit_tiny)")
    p.add_argument("--img-size", type=int, default=None, help="default 224 (synthetic: 32)")
    p.add_argument("--patch-size", type=int, default=None, help="default 16 (synthetic: 4)")
    p.add_argument("--global-pool", default=None, choices=["avg", "token"],
                   help="classifier input: mean of patch tokens or the cls token")
    p.add_argument("--rel-pos", action="store_true", help="relative position bias in each block")
    p.add_argument("--keep-blocks", type=int, default=None,
                   help="keep the first k loaded blocks, re-initialise the rest")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=data.DATASETS)
    g.add_argument("--data-root", default=None, help="folder that holds the dataset")
    g.add_argument("--download", action="store_true", help="let torchvision download the data")
    g.add_argument("--synthetic-size", type=int, default=2000, help="images in synthetic train")
    g.add_argument("--max-images", type=int, default=None,
                   help="use at most this many images of each split (quick experiments)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data-loading processes per GPU (default: min(8, CPU cores))")
    g = p.add_argument_group("optimisation (defaults from --recipe)")
    g.add_argument("--opt", default=None, choices=["adamw", "sgd", "lars"],
                   help="adamw (0.9, 0.999); sgd: Nesterov, momentum 0.9; lars (linprobe)")
    g.add_argument("--clip-grad", type=float, default=None,
                   help="clip the gradient norm to this value (transfer 1.0; others and 0: "
                        "no clipping)")
    g.add_argument("--batch-size", type=int, default=None, help="images per GPU per step")
    g.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--warmup-epochs", type=int, default=None)
    g.add_argument("--blr", type=float, default=None, help="base lr: lr = blr * batch / 256")
    g.add_argument("--lr", default=None,
                   help="absolute lr, or a comma list (one run each, then a table)")
    g.add_argument("--min-lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise lr decay (impr 0.85, mae 0.65, transfer 0.75; the papers "
                        "use 0.75 for contrastive checkpoints)")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    g.add_argument("--head-init-std", type=float, default=None,
                   help="std of the trunc-normal head init (impr/transfer 0.02 as timm, mae "
                        "2e-5 as FAIR, linprobe 0.01; Hiera fine-tuning keeps Hiera's own)")
    g.add_argument("--fresh-init", default="timm", choices=["timm", "mae"],
                   help="how a ViT's weights that --init does not give are drawn (all of them "
                        "from scratch; the blocks after --keep-blocks): timm's init, as the "
                        "papers' code, or MAE's (xavier, fixed sin-cos position embedding)")
    g = p.add_argument_group("augmentation (defaults from --recipe)")
    g.add_argument("--min-crop-scale", type=float, default=0.08,
                   help="smallest RandomResizedCrop area (all recipes: 0.08)")
    g.add_argument("--rand-aug", type=float, default=None,
                   help="RandAugment magnitude on timm's 0-10 scale (0: off)")
    g.add_argument("--rand-aug-std", type=float, default=None, help="std of that magnitude")
    g.add_argument("--color-jitter", type=float, default=None,
                   help="colour jitter strength (applied only when RandAugment is off, as timm)")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (0: off)")
    g.add_argument("--smoothing", type=float, default=None, help="label smoothing")
    g.add_argument("--reprob", type=float, default=None, help="random erasing probability")
    g = p.add_argument_group("run")
    g.add_argument("--eval", action="store_true", help="evaluate --init and exit")
    g.add_argument("--export", default=None, metavar="PATH",
                   help="write --init as a plain state dict for timm's VisionTransformer, exit")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    g.add_argument("--out-dir", default="out/finetune", help="checkpoints and log.jsonl")
    g.add_argument("--resume", default=None, help="continue a run from its checkpoint.pth")
    g.add_argument("--save-every", type=int, default=0,
                   help="also keep checkpoint-<epoch>.pth every this many epochs (0: never)")
    g.add_argument("--log-every", type=int, default=20, help="log every this many steps")
    g.add_argument("--seed", type=int, default=0)
    return p


def fill_defaults(args):
    """Unset flags come from: the --init checkpoint (architecture; for --eval/--export also the
    head layout), then the synthetic demo sizes, then the recipe."""
    taken = plumbing.inherit_resumed_args(args)
    if taken:
        plumbing.print0(f"--resume: {', '.join(taken)} taken from the checkpoint's run")
    source = plumbing.checkpoint_args(args.init) if args.init and os.path.isfile(args.init) else {}
    inherit = ["model", "patch_size", "img_size"]
    if (args.eval or args.export) and "recipe" in source:  # one of our fine-tuned files
        inherit += ["global_pool"]
        args.recipe = source["recipe"]
        args.rel_pos = args.rel_pos or source.get("rel_pos", False)
    for name in inherit:
        if getattr(args, name) is None and source.get(name) is not None:
            setattr(args, name, source[name])
    args.model = args.model or "vit_tiny"
    small = args.data == "synthetic"
    for name, value in dict(img_size=224, patch_size=16).items():
        if getattr(args, name) is None:
            setattr(args, name, SYNTHETIC[name] if small else value)
    if small and args.model in HIERA_CONFIGS and args.img_size == SYNTHETIC["img_size"]:
        args.img_size = 64  # Hiera needs multiples of 32 px and more than one mask unit
    if args.model in HIERA_CONFIGS and args.global_pool is None:
        args.global_pool = "avg"  # Hiera's only pooling, whatever the recipe
    for name, value in RECIPES[args.recipe].items():
        if name == "head_init_std" and args.model in HIERA_CONFIGS and args.recipe != "linprobe":
            continue  # Hiera keeps its own head init (official: 0.02 x 0.001) unless asked
        if getattr(args, name, None) is None:
            setattr(args, name, SYNTHETIC[name] if small and name in SYNTHETIC else value)
    if args.blr is None:
        args.blr = 1e-3
    if args.num_workers is None:
        args.num_workers = min(8, os.cpu_count() or 1)
    return args


def validate(args, parser):
    hiera = args.model in HIERA_CONFIGS
    if hiera and (args.rel_pos or args.global_pool == "token"):
        parser.error("Hiera mean-pools its tokens and has no relative position bias: drop "
                     "--rel-pos / --global-pool token")
    if hiera and args.img_size % 32:
        parser.error(f"--img-size {args.img_size} must be a multiple of 32 for Hiera")
    try:
        args.lrs = [None] if args.lr is None else [float(x) for x in str(args.lr).split(",")]
    except ValueError:
        parser.error(f"--lr {args.lr!r} must be a number or numbers separated by commas")
    depth = sum(HIERA_CONFIGS[args.model]["stages"]) if hiera else VIT_CONFIGS[args.model]["depth"]
    if args.keep_blocks is not None:
        if args.init is None:
            parser.error("--keep-blocks needs --init (blocks to keep)")
        if not 0 <= args.keep_blocks <= depth:
            parser.error(f"--keep-blocks {args.keep_blocks} must be within 0..{depth} "
                         f"({args.model} has {depth} blocks)")
    if (args.eval or args.export) and args.init is None:
        parser.error("--eval / --export need --init (the checkpoint to evaluate or export)")
    if len(args.lrs) > 1 and args.resume:
        parser.error("--resume continues one run; give a single --lr")
    if not hiera and args.img_size % args.patch_size:
        parser.error(f"--img-size {args.img_size} is not a multiple of --patch-size "
                     f"{args.patch_size}")
    for name in ("batch_size", "accum_iter", "epochs", "log_every", "synthetic_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.warmup_epochs <= args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs} must be within 0..--epochs "
                     f"{args.epochs}")
    if not 0 < args.layer_decay <= 1:
        parser.error(f"--layer-decay {args.layer_decay} must be in (0, 1]")
    if args.clip_grad is not None and args.clip_grad < 0:
        parser.error(f"--clip-grad {args.clip_grad} must be at least 0 (0: no clipping)")
    if args.data not in ("synthetic", "fashion_mnist") and args.data_root is None:
        parser.error(f"--data {args.data} needs --data-root (the folder that holds the data)")


# ----------------------------------------------------------------------------------------------
# The run


def prepare_model(args, num_classes, device):
    """Build, load --init (report printed), re-initialise the head and the dropped blocks."""
    model = build_classifier(args, num_classes)
    linprobe = args.recipe == "linprobe"
    if args.fresh_init == "timm" and args.model not in HIERA_CONFIGS:
        init_like_timm(model)  # timm's ViT, as the papers' code; --init overwrites the backbone
    if args.init:
        fresh = copy.deepcopy(model) if args.keep_blocks is not None else None
        load_pretrained(model, args.init, verbose=plumbing.is_main_process())
        if fresh is not None:
            reinit_blocks(model, fresh, args.keep_blocks)
            plumbing.print0(f"kept blocks 1..{args.keep_blocks}, re-initialised "
                            f"{args.keep_blocks + 1}..{model.depth}")
    if not (args.eval or args.export or args.resume) and args.head_init_std is not None:
        init_head(model, linprobe, args.head_init_std)
    if linprobe:
        freeze_backbone(model)
    else:
        model.pos_embed.requires_grad_(True)  # the ViT's is fixed in pre-training
    return model.to(device)


def export(args):
    """A plain state dict with timm's VisionTransformer keys (same shape, same logits)."""
    if args.model in HIERA_CONFIGS:
        raise CheckpointError("--export writes timm's VisionTransformer; a Hiera checkpoint "
                              "already has the official Hiera keys (timm's hiera "
                              "checkpoint_filter_fn converts them)")
    model = prepare_model(args, checkpoint_num_classes(args.init), torch.device("cpu"))
    if args.rel_pos or args.recipe == "linprobe":
        raise CheckpointError("timm's VisionTransformer has no relative position bias nor "
                              "BatchNorm head: export a fine-tuned model without --rel-pos")
    plumbing.save_checkpoint(model.state_dict(), args.export)
    cfg = VIT_CONFIGS[args.model]
    print(f"wrote {args.export}; load it with timm.models.vision_transformer.VisionTransformer("
          f"img_size={args.img_size}, patch_size={args.patch_size}, "
          f"embed_dim={cfg['embed_dim']}, depth={cfg['depth']}, num_heads={cfg['num_heads']}, "
          f"num_classes={model.num_classes}, global_pool='{args.global_pool}')"
          ".load_state_dict(torch.load(path))")


def checkpoint_num_classes(path):
    head = {k: v for k, v in read_state_dict(path).items()
            if k in ("head.weight", "head.1.weight", "head.projection.weight")}
    if not head:
        raise CheckpointError(f"{path} has no classifier head: export a fine-tuned checkpoint")
    return next(iter(head.values())).shape[0]


def train(args):
    """One fine-tuning run (or --eval). Returns the final evaluation plus the best top-1."""
    rank, world_size, device = plumbing.setup_distributed()
    is_main = rank == 0
    precision = plumbing.resolve_precision(args.precision, device)
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    plumbing.seed_everything(args.seed)
    val_set = data.build_dataset(args.data, args.data_root, "val",
                                 data.eval_transform(args.img_size), args.download,
                                 args.synthetic_size, args.img_size)
    num_classes = num_classes_of(args, val_set)
    val_set = limit(val_set, args.max_images)
    module = prepare_model(args, num_classes, device)
    compiled = plumbing.maybe_compile(module, use_compile)
    val_loader = data.make_loader(val_set, args.batch_size, 0, args.seed, rank, world_size,
                                  args.num_workers, shuffle=False, drop_last=False,
                                  pin_memory=device.type == "cuda")
    if args.eval:
        result = evaluate(compiled, val_loader, device, precision)
        plumbing.print0(f"{args.init}: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%"
                        f" on {result['images']} {args.data} validation images")
        return result

    os.makedirs(args.out_dir, exist_ok=True)
    last_path, best_path = (os.path.join(args.out_dir, n) for n in ("checkpoint.pth", "best.pth"))
    log = plumbing.JsonlLog(os.path.join(args.out_dir, "log.jsonl"), enabled=is_main)
    train_set = limit(data.build_dataset(args.data, args.data_root, "train",
                                         train_transform(args), args.download,
                                         args.synthetic_size, args.img_size), args.max_images)
    steps_per_epoch = len(train_set) // world_size // args.batch_size // args.accum_iter
    if steps_per_epoch < 1:
        raise data.DataError(f"{len(train_set)} images are fewer than one step needs; lower "
                             "--batch-size or --accum-iter")
    eff_batch = args.batch_size * args.accum_iter * world_size
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    optimizer = build_optimizer(args, module, lr, device)
    mixing = build_mixing(args, num_classes)
    start_epoch, step, best = 0, 0, {"top1": -1.0}
    counts = {"skipped_images": 0, "seen_images": 0}
    if args.resume:
        ckpt = plumbing.load_checkpoint(args.resume, args=args, same_args=ARCH_ARGS)
        module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step, best = ckpt["epoch"] + 1, ckpt["step"], ckpt["best"]
        counts = {k: ckpt[k] for k in counts}
        plumbing.print0(f"resumed from {args.resume} at epoch {start_epoch}, step {step}")
    model = plumbing.wrap_ddp(compiled, device)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    plumbing.print0(f"{args.model} {args.recipe} | {trainable / 1e6:.2f}M trainable params | "
                    f"{args.data}: {len(train_set)} train / {len(val_set)} val, {num_classes} "
                    f"classes, {args.img_size}px | {device}, {precision}, compile {use_compile}, "
                    f"{world_size} process(es) | batch {eff_batch}, {args.opt} lr {lr:.2e}")
    if args.rand_aug > 0 and args.color_jitter > 0:
        plumbing.print0("note: colour jitter is off while RandAugment is on (timm's behaviour)")

    loss_sum, loss_count, t0 = torch.zeros((), device=device), 0, time.time()
    result = best
    for epoch in range(start_epoch, args.epochs):
        plumbing.seed_everything(args.seed, epoch, rank)
        model.train()
        loader = data.make_loader(train_set, args.batch_size, epoch, args.seed, rank, world_size,
                                  args.num_workers, pin_memory=device.type == "cuda")
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main,
                   total=steps_per_epoch * args.accum_iter, leave=False)
        for it, imgs, labels in data.good_batches(bar, steps_per_epoch * args.accum_iter,
                                                  args.batch_size, counts):
            if it % args.accum_iter == 0:
                plumbing.set_lr(optimizer, plumbing.cosine_lr(step, total_steps, warmup_steps,
                                                              lr, args.min_lr))
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            targets = labels
            if mixing is not None:
                imgs, targets = mixing(imgs, labels)  # targets: (B, classes) probabilities
            with plumbing.autocast(device, precision):
                logits = model(imgs)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=args.smoothing)
            (loss / args.accum_iter).backward()
            loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1
            if (it + 1) % args.accum_iter:
                continue
            plumbing.optimizer_step(optimizer, args.clip_grad)
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                mean = plumbing.all_reduce_mean(loss_sum / loss_count).item()  # host sync
                plumbing.check_finite(mean, step, last_path)
                log.write(step=step, epoch=epoch + 1, loss=mean, lr=plumbing.current_lr(optimizer),
                          images_per_s=loss_count * args.batch_size * world_size
                          / (time.time() - t0))
                bar.set_postfix(loss=f"{mean:.4f}")
                loss_sum, loss_count, t0 = torch.zeros((), device=device), 0, time.time()
        if loss_count:
            plumbing.check_finite(plumbing.all_reduce_mean(loss_sum / loss_count).item(), step,
                                  last_path)
        result = evaluate(compiled, val_loader, device, precision)
        is_best = result["top1"] > best["top1"]
        if is_best:
            best = dict(result, epoch=epoch + 1)
        log.write(epoch=epoch + 1, step=step, **result, best_top1=best["top1"])
        plumbing.print0(f"epoch {epoch + 1}/{args.epochs}: top-1 {result['top1']:.2f}%, top-5 "
                        f"{result['top5']:.2f}%, best {best['top1']:.2f}% (epoch {best['epoch']})")
        if is_main:
            state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                     "epoch": epoch, "step": step, "args": vars(args), "best": best,
                     "metrics": result, **counts}
            plumbing.save_checkpoint(state, last_path)
            if args.save_every and (epoch + 1) % args.save_every == 0:
                plumbing.save_checkpoint(state, os.path.join(args.out_dir,
                                                             f"checkpoint-{epoch + 1}.pth"))
            if is_best:
                plumbing.save_checkpoint({k: v for k, v in state.items() if k != "optimizer"},
                                         best_path)
    return dict(result, best_top1=best["top1"])


def sweep(args):
    """Run train() once per --lr, each in its own folder; print the table of results."""
    rows = []
    for lr in args.lrs:
        run = copy.copy(args)
        run.lr = lr
        if len(args.lrs) > 1:
            run.out_dir = os.path.join(args.out_dir, f"lr{lr:g}")
        rows.append((lr, train(run)))
    if len(rows) > 1:
        plumbing.print0(f"\n{'lr':>8} | {'best top-1':>10} | {'last top-1':>10} | {'last top-5':>10}")
        for lr, r in rows:
            plumbing.print0(f"{lr:>8g} | {r['best_top1']:>10.2f} | {r['top1']:>10.2f} | "
                            f"{r['top5']:>10.2f}")
    return rows


def main(argv=None):
    parser = get_parser()
    args = fill_defaults(parser.parse_args(argv))
    validate(args, parser)
    try:
        if args.export:
            return export(args)
        return sweep(args)
    except (data.DataError, CheckpointError, plumbing.RunError) as e:
        sys.exit(f"error: {e}")
    finally:
        plumbing.cleanup_distributed()


if __name__ == "__main__":
    main()
