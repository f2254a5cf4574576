"""classifier.py: the ViT or Hiera that finetune.py trains, evaluates and exports: its head
and its initialisation, the layer-wise lr decay and the optimizer (LARS for linear probing, as
FAIR MAE), the blocks kept from pre-training (--keep-blocks), the frozen backbone of linear
probing, its evaluation (top-1 / top-5) and the export to timm's hub layout.
"""
import copy
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import data
import loop
import plumbing
from checkpoints import CheckpointError, load_pretrained, read_state_dict
from presets import build_model, preset_facts


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


def check_flags(parser, args, facts, source):
    """finetune.py's rules for the model it builds, one line each naming the fix (parser.error):
    the preset's pooling and relative positions (facts: presets.preset_facts), --keep-blocks,
    linear probing's frozen backbone, the --export folder; and --eval / --export of one of our
    fine-tuned files (source: its run's args) use it as it was trained."""
    if (args.rel_pos and not facts["rel_pos"]) or \
            args.global_pool not in (None, *facts["poolings"]):
        parser.error(f"{args.model} mean-pools its tokens and has no relative position bias: drop "
                     "--rel-pos / --global-pool token")
    depth = facts["depth"]
    if args.keep_blocks is not None:
        if args.init is None and args.resume is None:
            parser.error("--keep-blocks needs --init (blocks to keep)")
        if not 0 <= args.keep_blocks <= depth:
            parser.error(f"--keep-blocks {args.keep_blocks} must be within 0..{depth} "
                         f"({args.model} has {depth} blocks)")
    if "recipe" in source:  # one of our fine-tuned files, scored or exported as it was trained
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in
                   ("recipe", "global_pool", "rel_pos")
                   if getattr(args, k) != source.get(k, parser.get_default(k))]
        # the file's kept blocks are its trained weights; --keep-blocks would re-draw the rest
        changed += [f"--keep-blocks {args.keep_blocks}"] if args.keep_blocks is not None else []
        if changed:
            parser.error(f"--eval / --export use {args.init} as it was fine-tuned: drop "
                         f"{', '.join(changed)} (it would change the model, not score it)")
    if args.recipe == "linprobe" and not (args.eval or args.export):  # the backbone is frozen
        if args.keep_blocks is not None or args.rel_pos:
            parser.error("--recipe linprobe freezes the pre-trained backbone: --keep-blocks / "
                         "--rel-pos would freeze freshly initialised weights; drop them")
        if args.layer_decay != 1:
            parser.error(f"--layer-decay {args.layer_decay} has no effect with --recipe linprobe "
                         "(only the head trains): drop it")
        if args.batch_size < 2:
            parser.error("--recipe linprobe trains a BatchNorm head, which needs at least 2 "
                         "images a batch: --batch-size 2 or more")
    if args.export and not args.export.endswith((".pth", ".pt", ".bin", ".safetensors")):
        plumbing.check_out_dir(parser, args.export, "--export")
        if os.path.isfile(os.path.join(args.export, "model.safetensors")) and not args.overwrite:
            parser.error(f"--export {args.export} holds an earlier export (model.safetensors): "
                         "choose another folder, or replace it with --overwrite")


def build_classifier(args, num_classes):
    """The ViT or Hiera to train. linprobe: the head is BatchNorm1d(affine=False) + Linear and
    nothing else trains (FAIR MAE). Fine-tuning trains the ViT's position embedding too, as
    FAIR's fine-tuning (where it is an ordinary timm parameter)."""
    model = build_model(args.model, img_size=args.img_size, patch_size=args.patch_size,
                        num_classes=num_classes, global_pool=args.global_pool,
                        drop_path_rate=args.drop_path, rel_pos=args.rel_pos)  # Hiera: mean-pooled
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


def prepare_model(args, num_classes, device):
    """Build, load --init (report printed), re-initialise the head and the dropped blocks."""
    model = build_classifier(args, num_classes)
    linprobe = args.recipe == "linprobe"
    if args.fresh_init == "timm" and preset_facts(args.model)["timm_init"]:
        init_like_timm(model)  # timm's ViT, as the papers' code; --init overwrites the backbone
    if args.init:
        fresh = copy.deepcopy(model) if args.keep_blocks is not None else None
        load_pretrained(model, args.init, verbose=plumbing.is_main_process(),
                        trust=args.trust_checkpoint)
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
    """--init in timm's hub layout: DIR/model.safetensors (timm's VisionTransformer keys) and
    DIR/config.json (architecture, num_classes, model_args with the head count, pretrained_cfg).
    timm.create_model('local-dir:DIR', pretrained=True) builds and loads it (timm >= 1.0.16), as
    does finetune.py --init DIR/model.safetensors (config.json gives the architecture)."""
    if not preset_facts(args.model)["timm_export"]:
        raise CheckpointError("--export writes timm's VisionTransformer; a Hiera checkpoint "
                              "already has the official Hiera keys (timm's hiera "
                              "checkpoint_filter_fn converts them)")
    if (os.path.exists(args.export) and not os.path.isdir(args.export)) or \
            args.export.endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise CheckpointError(f"--export {args.export} names a file: give a folder (it will "
                              "hold model.safetensors and config.json)")
    try:  # the destination first: a bad one is named even without the package
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("--export writes model.safetensors, which needs the safetensors "
                              "package: pip install safetensors") from None
    model = prepare_model(args, checkpoint_num_classes(args.init, args.trust_checkpoint),
                          torch.device("cpu"))
    if args.rel_pos or args.recipe == "linprobe":
        raise CheckpointError("timm's VisionTransformer has no relative position bias nor "
                              "BatchNorm head: export a fine-tuned model without --rel-pos")
    os.makedirs(args.export, exist_ok=True)
    weights = os.path.join(args.export, "model.safetensors")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    config = os.path.join(args.export, "config.json")
    with open(config + ".tmp", "w") as f:
        json.dump(hub_config(args, model), f, indent=2)
    os.replace(config + ".tmp", config)
    print(f"wrote {weights} and {config}; load them with timm.create_model('local-dir:"
          f"{args.export}', pretrained=True) or finetune.py --init {weights}")


def hub_config(args, model):
    """timm's config.json for a ViT (timm/models/_hub.py save_config_for_hf): the architecture
    named by size, the actual shape in model_args (which override the name's defaults, so the
    papers' 12-head ViT-Tiny stays 12-head), and the evaluation transform in pretrained_cfg."""
    size = args.model.split("_")[1]  # tiny, small, base, large
    h, w = model.img_size
    model_args = dict(img_size=[h, w], patch_size=model.patch_size, embed_dim=model.embed_dim,
                      depth=model.depth, num_heads=model.num_heads, num_classes=model.num_classes,
                      global_pool=model.global_pool)
    return {"architecture": f"vit_{size}_patch16_224", "num_classes": model.num_classes,
            "num_features": model.num_features, "global_pool": model.global_pool,
            "model_args": model_args,
            "pretrained_cfg": {"tag": "nanomim", "custom_load": False, "input_size": [3, h, w],
                               "fixed_input_size": True, "interpolation": "bicubic",
                               "crop_pct": 224 / 256, "crop_mode": "center",
                               "mean": list(augment.IMAGENET_MEAN),
                               "std": list(augment.IMAGENET_STD),
                               "num_classes": model.num_classes, "pool_size": None,
                               "first_conv": "patch_embed.proj", "classifier": "head"}}


def checkpoint_num_classes(path, trust=False):
    head = {k: v for k, v in read_state_dict(path, trust).items()
            if k in ("head.weight", "head.1.weight", "head.projection.weight")}
    if not head:
        raise CheckpointError(f"{path} has no classifier head (a pre-training checkpoint?): "
                              "--eval and --export need a fine-tuned one; fine-tune it first")
    return next(iter(head.values())).shape[0]


@torch.no_grad()
def evaluate(model, loader, device, precision):
    """Top-1 / top-5 accuracy (%) and mean cross-entropy, summed over all processes."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top-1, top-5, images
    for imgs, labels in loader:
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
    if n == 0:
        raise data.DataError("no validation image could be read (see the warnings above): check "
                             "the val split under --data-root")
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1),
            "val_loss": loss / max(n, 1), "images": int(n)}


def build_optimizer(args, model, lr, device):
    decay = (lambda name: layer_decay_scale(name, model.depth, args.layer_decay)) \
        if args.layer_decay != 1.0 else None
    groups = loop.param_groups(model, args.weight_decay, decay,
                               no_decay_names=("cls_token", "pos_embed"))  # timm's
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    if args.opt == "sgd":  # Nesterov, as MAE-Lite's transfer code
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return loop.LARS(groups, lr=lr, weight_decay=args.weight_decay)
