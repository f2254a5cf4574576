"""finetune.py: fine-tuning, transfer, linear probing and the reserved-blocks study.

    python finetune.py --init out/mae/checkpoint.pth                 # demo: synthetic, CPU ok
    python finetune.py --init mae_tiny.pth --data imagefolder --data-root /imagenet   # impr
    python finetune.py --init ckpt.pth --recipe transfer --data flowers102 --data-root ~/data \
        --lr 0.01,0.03,0.1                                          # one run per lr, a table
    python finetune.py --init ckpt.pth --recipe linprobe ...        # frozen backbone
    python finetune.py --init out/ft/best.pth --eval                # evaluate only
    python finetune.py --init out/ft/best.pth --export out/vit_tiny_ft   # timm's hub layout

--init takes our pre-training or fine-tuning checkpoints, FAIR MAE, MAE-Lite and timm files
(checkpoints.load_pretrained reports what it loaded, dropped and initialised), or nothing (from
scratch). A recipe is a set of defaults (RECIPES below); every flag overrides its entry.
"""
import argparse
import copy
import os
import sys

import torch.nn.functional as F

import augment
import classifier
import dali_loader
import data
import loop
import plumbing
import weights
from checkpoints import CheckpointError, read_hub_config
from model import VIT_CONFIGS
from presets import model_names, preset_facts

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
    "transfer": dict(opt="sgd", lr=[0.01, 0.03, 0.1], weight_decay=0.0, layer_decay=0.75,
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
# Data


def class_names(dataset):
    """The class names of an image folder under any Subsets, else None."""
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset.raw, "classes", None)


def num_classes_of(args, dataset):
    classes = class_names(dataset)
    return len(classes) if classes is not None and args.data == "imagefolder" \
        else data.NUM_CLASSES[args.data]


# ----------------------------------------------------------------------------------------------
# Command line


def lr_list(text):
    """argparse type of --lr: '0.01,0.03' -> [0.01, 0.03] (one run each)."""
    try:
        return [float(x) for x in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number or numbers separated by "
                                         "commas") from None


def get_parser():
    """The flags, with the impr recipe's defaults on real data (ImageNet-1k); parse_args layers
    the chosen recipe's, the synthetic demo's and the --init checkpoint's on top."""
    r = RECIPES["impr"]
    p = argparse.ArgumentParser(description="Fine-tune, transfer or linearly probe a ViT.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", default=None,
                   help="checkpoint to start from (ours, FAIR MAE, MAE-Lite, timm) or a published "
                        f"name ({weights.names_text()}; --list-weights), downloaded once into "
                        "torch's hub cache; none: scratch")
    p.add_argument("--list-weights", action=weights.ListWeights,
                   help="print the published weights --init takes by name (architecture, source, "
                        "licence) and exit")
    p.add_argument("--recipe", default="impr", choices=sorted(RECIPES),
                   help="set of defaults: impr (papers), mae (FAIR), transfer, linprobe")
    p.add_argument("--model", default="vit_tiny", choices=model_names(),
                   help="architecture (an --init checkpoint of ours: its own)")
    p.add_argument("--img-size", type=int, default=224,
                   help="input size in pixels (synthetic: 32, Hiera 64; --init of ours: its own)")
    p.add_argument("--patch-size", type=int, default=16,
                   help="patch size in pixels (synthetic: 4; --init of ours: its own)")
    p.add_argument("--global-pool", default=r["global_pool"], choices=["avg", "token"],
                   help="classifier input: mean of patch tokens or the cls token (linprobe)")
    p.add_argument("--rel-pos", action="store_true", help="relative position bias in each block")
    p.add_argument("--keep-blocks", type=int, default=None,
                   help="keep the first k loaded blocks, re-initialise the rest (none: keep all)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=data.DATASETS, help="dataset")
    g.add_argument("--data-root", default=None, help="folder that holds the dataset")
    g.add_argument("--download", action="store_true", help="let torchvision download the data")
    g.add_argument("--synthetic-size", type=int, default=2000, help="images in synthetic train")
    g.add_argument("--loader", default="pil", choices=["pil", "dali"],
                   help="training images: pil: PIL decode + augment in workers; dali: NVIDIA DALI "
                        "(pip install nvidia-dali-cuda130; --data imagefolder, no RandAugment: "
                        "--rand-aug 0). Evaluation always: pil")
    g.add_argument("--max-images", type=int, default=None,
                   help="use at most this many images of each split, evenly spaced (none: all)")
    g.add_argument("--labels-per-class", type=int, default=None,
                   help="train on a fixed random subset with this many images of each class "
                        "(60: the papers' 1%% of ImageNet / Fashion-MNIST; none: all)")
    g.add_argument("--subset-seed", type=int, default=0,
                   help="seed that draws the --labels-per-class subset")
    g = p.add_argument_group("optimisation (defaults: the --recipe's, RECIPES in finetune.py)")
    g.add_argument("--opt", default=r["opt"], choices=["adamw", "sgd", "lars"],
                   help="adamw (0.9, 0.999); sgd: Nesterov, momentum 0.9 (transfer); lars "
                        "(linprobe)")
    g.add_argument("--clip-grad", type=float, default=r["clip_grad"],
                   help="clip the gradient norm to this value (transfer 1.0; none or 0: no "
                        "clipping)")
    g.add_argument("--batch-size", type=int, default=r["batch_size"],
                   help="images per GPU per step (synthetic: 64)")
    g.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--epochs", type=int, default=r["epochs"], help="training epochs "
                   "(synthetic: 10)")
    g.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear warmup epochs (none given: the recipe's fraction of --epochs, "
                        "e.g. impr 5 of 300; synthetic: 1)")
    g.add_argument("--blr", type=float, default=r["blr"], help="base lr: lr = blr * batch / 256")
    g.add_argument("--lr", type=lr_list, default=None,
                   help="absolute lr, or a comma list: one run each, then a table (transfer: "
                        "0.01,0.03,0.1; none: from --blr)")
    g.add_argument("--min-lr", type=float, default=r["min_lr"], help="lr at the end of the cosine")
    g.add_argument("--weight-decay", type=float, default=r["weight_decay"], help="weight decay")
    g.add_argument("--layer-decay", type=float, default=r["layer_decay"],
                   help="layer-wise lr decay (mae 0.65, transfer 0.75, linprobe 1; the papers "
                        "use 0.75 for contrastive checkpoints)")
    g.add_argument("--drop-path", type=float, default=r["drop_path"],
                   help="stochastic depth rate (mae 0.1)")
    g.add_argument("--head-init-std", type=float, default=r["head_init_std"],
                   help="std of the trunc-normal head init (transfer 0.02 as timm, mae 2e-5 as "
                        "FAIR, linprobe 0.01; Hiera fine-tuning: none, Hiera's own)")
    g.add_argument("--fresh-init", default="timm", choices=["timm", "mae"],
                   help="how a ViT's weights that --init does not give are drawn (all of them "
                        "from scratch; the blocks after --keep-blocks): timm's init, as the "
                        "papers' code, or MAE's (xavier, fixed sin-cos position embedding)")
    g = p.add_argument_group("augmentation (defaults: the --recipe's)")
    g.add_argument("--min-crop-scale", type=float, default=0.08,
                   help="smallest RandomResizedCrop area (all recipes: 0.08)")
    g.add_argument("--rand-aug", type=float, default=r["rand_aug"],
                   help="RandAugment magnitude on timm's 0-10 scale (mae 9; 0: off)")
    g.add_argument("--rand-aug-std", type=float, default=r["rand_aug_std"],
                   help="std of that magnitude, drawn per op")
    g.add_argument("--color-jitter", type=float, default=r["color_jitter"],
                   help="colour jitter strength (applied only when RandAugment is off, as timm)")
    g.add_argument("--mixup", type=float, default=r["mixup"], help="mixup alpha (mae 0.8; 0: off)")
    g.add_argument("--cutmix", type=float, default=r["cutmix"], help="cutmix alpha (mae 1; 0: off)")
    g.add_argument("--smoothing", type=float, default=r["smoothing"],
                   help="label smoothing (mae 0.1)")
    g.add_argument("--reprob", type=float, default=r["reprob"],
                   help="random erasing probability (mae 0.25)")
    g = p.add_argument_group("run")
    g.add_argument("--eval", action="store_true", help="evaluate --init and exit")
    g.add_argument("--export", default=None, metavar="DIR",
                   help="write --init in timm's hub layout (DIR/model.safetensors + config.json: "
                        "timm.create_model('local-dir:DIR', pretrained=True)), exit")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the --init file in full (only for files you trust: a pickle "
                        "can run code); by default only tensors and argparse.Namespace")
    plumbing.add_run_flags(g, "out/finetune")
    g.add_argument("--save-every", type=int, default=0,
                   help="also keep checkpoint-<epoch>.pth every this many epochs (0: never)")
    g.add_argument("--eval-every", type=int, default=1,
                   help="evaluate every this many epochs and after the last (0: only after the "
                        "last, so no epoch is chosen by its validation accuracy)")
    return p


def parse_args(argv=None):
    """Flags -> checked args, over layered defaults (plumbing.parse_layered): the recipe (for
    --eval / --export of one of our fine-tuned files: the file's recipe and head layout), the
    synthetic demo's sizes, the --init checkpoint's architecture, Hiera's pooling and sizes;
    then --resume's run, then the command line."""
    parser = get_parser()

    def layers(given, typed):
        source = init_source_args(given.init) if given.init else {}
        recipe = given.recipe
        evaluating = (given.eval or given.export) and "recipe" in source  # our fine-tuned file
        if evaluating:
            recipe = source["recipe"]
        found = [{k: v for k, v in RECIPES[recipe].items() if k != "warmup_epochs"}]
        if plumbing.checkpoint_script(source) == "moco.py" and recipe != "linprobe":
            found.append(dict(layer_decay=0.75))  # the papers' layer decay for MoCo-v3 models
        if evaluating:  # the file's head layout, over its recipe's
            found.append(dict(recipe=recipe, global_pool=source.get("global_pool"),
                              rel_pos=source.get("rel_pos", False)))
        if given.data == "synthetic":
            found.append(SYNTHETIC)
        arch = ("model", "img_size", "patch_size") + (("global_pool",) if given.eval or given.export
                                                      else ())  # a classifier keeps its pooling
        found.append({k: source[k] for k in arch if k in source and source[k] is not None})
        model = typed.get("model") or source.get("model") or parser.get_default("model")
        facts = preset_facts(model)  # Hiera: mean-pooled, 32-px multiples, its own head init
        found.append(dict(global_pool=facts["poolings"][0]) if len(facts["poolings"]) == 1 else {})
        if facts["demo_img_size"] and given.data == "synthetic" and "img_size" not in source:
            found.append(dict(img_size=facts["demo_img_size"]))
        if not facts["draws_head"] and recipe != "linprobe":
            found.append(dict(head_init_std=None))
        return found

    args, given = plumbing.parse_layered(parser, argv, "finetune.py", layers)
    if given.auto_resume and args.lr is not None and len(args.lr) > 1:
        parser.error("--resume auto continues one run: with an lr sweep, give each lr its own "
                     "run (--lr 0.01 --out-dir OUT/lr0.01 --resume auto)")
    plumbing.warmup_from_fraction(args, RECIPES[args.recipe]["warmup_epochs"]
                                  / RECIPES[args.recipe]["epochs"])
    source = init_source_args(given.init) if given.init and (args.eval or args.export) else {}
    validate(args, parser, source)
    try:  # a name -> its file in the hub cache (downloaded once); from here on a path
        args.init = weights.resolve(args.init, "--init")
    except weights.WeightsError as e:
        sys.exit(f"error: {e}")
    return args


def init_source_args(path):
    """The architecture flags an --init file states: our checkpoints' args, or the config.json
    of timm's hub layout beside it (what --export writes), a published name's (weights.py); {}
    for files that say nothing."""
    if path in weights.WEIGHTS:
        return weights.stated_args(path)
    stored = plumbing.checkpoint_args(path)
    if stored:
        return stored
    try:
        config = read_hub_config(path)
    except CheckpointError:
        return {}  # the load itself reports it
    model_args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    shape = {k: model_args.get(k) for k in ("embed_dim", "depth", "num_heads")}
    found = {}
    for name, cfg in VIT_CONFIGS.items():
        if cfg == shape:
            found["model"] = name
    size = model_args.get("img_size")
    if isinstance(size, int) or (isinstance(size, list) and len(set(size)) == 1):
        found["img_size"] = size if isinstance(size, int) else size[0]
    if isinstance(model_args.get("patch_size"), int):
        found["patch_size"] = model_args["patch_size"]
    if config.get("global_pool") in ("avg", "token"):
        found["global_pool"] = config["global_pool"]
    return found


# The range of every numeric flag (plumbing.check_ranges); the rules between flags follow.
RANGES = {**plumbing.RUN_RANGES,
          "img_size": "[1, inf)", "patch_size": "[1, inf)", "batch_size": "[1, inf)",
          "accum_iter": "[1, inf)", "epochs": "[1, inf)", "synthetic_size": "[1, inf)",
          "max_images": "[1, inf)", "labels_per_class": "[1, inf)", "save_every": "[0, inf)",
          "eval_every": "[0, inf)", "blr": "(0, inf)", "lr": "(0, inf)", "min_lr": "[0, inf)",
          "weight_decay": "[0, inf)", "layer_decay": "(0, 1]", "clip_grad": "[0, inf)",
          "drop_path": "[0, 1)", "head_init_std": "[0, inf)", "min_crop_scale": "(0, 1]",
          "rand_aug": "[0, 10]", "rand_aug_std": "[0, inf)", "color_jitter": "[0, inf)",
          "mixup": "[0, inf)", "cutmix": "[0, inf)", "smoothing": "[0, 1)", "reprob": "[0, 1]",
          "subset_seed": "[0, 4294967295]"}


def validate(args, parser, source=None):
    """Each flag's range (RANGES), then the rules that tie flags together, each naming the fix
    (the model's: classifier.check_flags; source: an --eval / --export file's run args)."""
    plumbing.check_ranges(parser, args, RANGES)
    facts = preset_facts(args.model)
    plumbing.check_run_flags(parser, args, facts["size_unit"],
                             writes_checkpoints=not (args.eval or args.export))
    if args.data == "folder":
        parser.error("--data folder has no labels: fine-tuning needs one sub-folder per class "
                     "(--data imagefolder)")
    if args.loader == "dali" and args.data != "imagefolder":
        parser.error("--loader dali reads image files: use it with --data imagefolder")
    if args.loader == "dali" and args.rand_aug > 0:
        parser.error(f"--loader dali has no RandAugment (timm's, which the recipes use): give "
                     f"--rand-aug 0 (colour jitter --color-jitter {args.color_jitter} then "
                     "applies, as timm), or --loader pil")
    if (args.eval or args.export) and args.init is None:
        parser.error("--eval / --export need --init (the checkpoint to evaluate or export)")
    classifier.check_flags(parser, args, facts, source or {})
    if args.init in weights.WEIGHTS and weights.WEIGHTS[args.init]["model"] != args.model:
        parser.error(f"--init {args.init} is a {weights.WEIGHTS[args.init]['model']}: drop --model "
                     f"{args.model} (or give --model {weights.WEIGHTS[args.init]['model']})")
    if args.lr is not None and len(args.lr) > 1 and args.resume:
        parser.error("--resume continues one run; give a single --lr")


# ----------------------------------------------------------------------------------------------
# The run


def build_loaders(args, rank, world_size, device):
    """(train set, its data.Loader, val set, one pass over it, number of classes), the train set
    cut to --labels-per-class and --max-images."""
    val_set = data.build_dataset(args.data, args.data_root, "val",
                                 augment.eval_transform(args.img_size), args.download,
                                 args.synthetic_size, args.img_size)
    num_classes = num_classes_of(args, val_set)
    val_set = data.evenly_spaced(val_set, args.max_images)
    val_loader = data.Loader(val_set, args.batch_size, args.seed, rank=rank,
                             world_size=world_size, num_workers=args.num_workers, shuffle=False,
                             drop_last=False, pin_memory=device.type == "cuda").epoch(0)
    if args.eval:
        return None, None, val_set, val_loader, num_classes
    train_set = data.build_dataset(args.data, args.data_root, "train",
                                   augment.train_transform(args), args.download,
                                   args.synthetic_size, args.img_size)
    if class_names(train_set) != class_names(val_set):
        raise data.DataError(f"the train and val folders under {args.data_root} hold different "
                             f"classes ({len(class_names(train_set))} vs "
                             f"{len(class_names(val_set))}): give both splits the same class "
                             "folders")
    if args.labels_per_class is not None:  # the data-insufficient regime: a few labels a class
        train_set = data.per_class_subset(train_set, args.labels_per_class, args.subset_seed)
    train_set = data.evenly_spaced(train_set, args.max_images)
    if args.loader == "dali":  # DALI's graph; train_transform for what it cannot decode
        graph = dali_loader.finetune_graph(args.img_size, args.min_crop_scale, args.color_jitter,
                                           args.reprob)
        train_loader = dali_loader.DaliLoader(
            data.samples_of(train_set), args.batch_size, args.seed, device, graph,
            augment.train_transform(args), (3, args.img_size, args.img_size), rank, world_size,
            args.num_workers)
    else:
        train_loader = data.Loader(train_set, args.batch_size, args.seed, rank=rank,
                                   world_size=world_size, num_workers=args.num_workers,
                                   pin_memory=device.type == "cuda")  # workers live for the run
    return train_set, train_loader, val_set, val_loader, num_classes


def evaluate_init(args, model, val_loader, num_classes, device, precision):
    """--eval: the top-1 / top-5 of the fine-tuned --init on the val split."""
    head = classifier.checkpoint_num_classes(args.init, args.trust_checkpoint)
    if head != num_classes:
        raise CheckpointError(f"{args.init}'s head has {head} classes but --data {args.data} has "
                              f"{num_classes}: evaluate it on the data it was fine-tuned on")
    result = classifier.evaluate(model, val_loader, device, precision)
    plumbing.print0(f"{args.init}: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on "
                    f"{result['images']} {args.data} validation images")
    return result


def train(args):
    """One fine-tuning run (or --eval). Returns the final evaluation plus the best top-1."""
    rank, world_size, device, precision, use_compile = plumbing.start_run(args)
    is_main = rank == 0
    plumbing.seed_everything(args.seed)
    train_set, train_loader, val_set, val_loader, num_classes = build_loaders(args, rank,
                                                                              world_size, device)
    module = classifier.prepare_model(args, num_classes, device)
    compiled = plumbing.maybe_compile(module, use_compile)
    if args.eval:
        return evaluate_init(args, compiled, val_loader, num_classes, device, precision)
    log, last_path = loop.open_run(args, is_main)
    steps_per_epoch, eff_batch, lr = plumbing.steps_and_lr(  # one run: one lr
        args, len(train_set), world_size, lr=args.lr[0] if args.lr else None)
    optimizer = classifier.build_optimizer(args, module, lr, device)
    scaler = plumbing.grad_scaler(precision, device)
    mixing = augment.build_mixing(args, num_classes)
    ckpt = loop.load_checkpoint(args.resume, args=args, same_args=ARCH_ARGS) if args.resume \
        else None
    if ckpt is not None:
        module.load_state_dict(ckpt["model"])
    start_epoch, step, bad_images = loop.resume_into(ckpt, args.resume, optimizer, scaler,
                                                     args.epochs)
    best = ckpt["best"] if ckpt is not None else {"top1": -1.0}
    model = plumbing.wrap_ddp(compiled, device)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    plumbing.print0(f"{args.model} {args.recipe} | {trainable / 1e6:.2f}M trainable params | "
                    f"{args.data}: {len(train_set)} train / {len(val_set)} val, {num_classes} "
                    f"classes, {args.img_size}px | {device}, {precision}, compile {use_compile}, "
                    f"{plumbing.processes_text(world_size)} | batch {eff_batch}, {args.opt} "
                    f"lr {lr:.2e}")
    if args.rand_aug > 0 and args.color_jitter > 0:
        plumbing.print0("note: colour jitter is off while RandAugment is on (timm's behaviour)")

    losses = loop.LossLog(log, last_path, world_size)
    result = best
    for epoch in range(start_epoch, args.epochs):
        model.train()
        bar = loop.epoch_batches(train_loader, args, epoch, steps_per_epoch, bad_images, rank)
        steps_before = step
        for it, (imgs, labels) in enumerate(bar):
            if it % args.accum_iter == 0:
                loop.set_lr(optimizer, loop.cosine_lr(step, total_steps, warmup_steps, lr,
                                                      args.min_lr))
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            targets = labels
            if mixing is not None:
                imgs, targets = mixing(imgs, labels)  # targets: (B, classes) probabilities
            with plumbing.autocast(device, precision):
                logits = model(imgs)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=args.smoothing)
            scaler.scale(loss / args.accum_iter).backward()
            losses.add({"loss": loss}, imgs.shape[0])
            if (it + 1) % args.accum_iter:
                continue
            loop.optimizer_step(optimizer, args.clip_grad, scaler)
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                losses.write(step, epoch, optimizer, bar, bad_images)
        loop.end_epoch(losses, optimizer, step, steps_before, epoch, bad_images)
        is_best = False
        if epoch + 1 == args.epochs or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            result = classifier.evaluate(compiled, val_loader, device, precision)
            is_best = result["top1"] > best["top1"]
            best = dict(result, epoch=epoch + 1) if is_best else best
            log.write(epoch=epoch + 1, step=step, **result, best_top1=best["top1"])
            plumbing.print0(f"epoch {epoch + 1}/{args.epochs}: top-1 {result['top1']:.2f}%, "
                            f"top-5 {result['top5']:.2f}%, best {best['top1']:.2f}% (epoch "
                            f"{best['epoch']})")
        if is_main:
            state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                     "args": vars(args), "best": best, "metrics": result,
                     **bad_images.state_dict()}
            loop.save_epoch(state, args.out_dir, epoch, args.save_every)
            if is_best:
                loop.save_checkpoint({k: v for k, v in state.items()
                                      if k not in ("optimizer", "scaler")},
                                     os.path.join(args.out_dir, "best.pth"))
    if is_main and start_epoch < args.epochs:  # else a finished run, resumed: nothing new
        loop.finish_run(args.out_dir, log, step)
    return dict(result, best_top1=best["top1"])


def sweep(args):
    """Run train() once per --lr, each in its own folder; print the table of results."""
    rows = []
    sweeping = args.lr and len(args.lr) > 1
    if sweeping and args.overwrite and not args.resume and os.path.isdir(args.out_dir) \
            and int(os.environ.get("RANK", "0")) == 0:  # an earlier single run's, beside lr*/
        loop.clear_run(args.out_dir, keep=(args.init,))
    for lr in args.lr or [None]:
        run = copy.copy(args)
        run.lr = None if lr is None else [lr]
        if sweeping:
            run.out_dir = os.path.join(args.out_dir, f"lr{lr:g}")
        rows.append((lr, train(run)))
    if len(rows) > 1:
        plumbing.print0(f"\n{'lr':>8} | {'best top-1':>10} | {'last top-1':>10} | "
                        f"{'last top-5':>10}")
        for lr, r in rows:
            plumbing.print0(f"{lr:>8g} | {r['best_top1']:>10.2f} | {r['top1']:>10.2f} | "
                            f"{r['top5']:>10.2f}")
    return rows


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.export:
            return classifier.export(args)
        if args.eval:  # one evaluation, whatever lrs the recipe sweeps
            return train(args)
        return sweep(args)
    except (data.DataError, CheckpointError, plumbing.RunError) as e:
        sys.exit(f"error: {e}")
    finally:
        plumbing.cleanup_distributed()


if __name__ == "__main__":
    main()
