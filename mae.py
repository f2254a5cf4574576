"""mae.py: masked-autoencoder pre-training (the models are in mae_model.py), with or without
distillation from a teacher (distill.py).

    python mae.py                                   # demo: vit_tiny on synthetic shapes, CPU ok
    python mae.py --data imagefolder --data-root /path/to/imagenet --epochs 400 ...   # MAE-Tiny
    python mae.py --distill-layer 12 --recon-layer 8                  # D2-MAE (demo teacher)
"""
import argparse
import os
import sys

import torch

import augment
import dali_loader
import data
import device_loader
import distill
import loop
import plumbing
import probe
import teachers
import viewers
import weights
from checkpoints import CheckpointError, load_pretrained
from mae_model import DECODER_PREFIXES, PRETRAIN_DEFAULTS
from presets import build_mae, model_names, preset_facts


# ----------------------------------------------------------------------------------------------
# Command line


def block_list(text):
    """argparse type of --distill-layer / --teacher-layer: '6,12' -> [6, 12]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be block numbers separated by commas, "
                                         "e.g. 12 or 6,12") from None


def get_parser():
    """The flags, with vit_tiny's defaults on real data (ImageNet-1k); parse_args layers the
    other models' and the synthetic demo's defaults on top."""
    p = argparse.ArgumentParser(description="MAE pre-training of a ViT (nanoMIM).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_tiny", choices=model_names(),
                   help="encoder (hiera_*: Hiera's sparse MAE)")
    p.add_argument("--img-size", type=int, default=224,
                   help="input size in pixels (--data synthetic: 32, Hiera 64)")
    p.add_argument("--patch-size", type=int, default=16,
                   help="patch size in pixels (--data synthetic: 4)")
    p.add_argument("--mask-ratio", type=float, default=0.75,
                   help="fraction of patches (Hiera: mask units) removed (hiera_tiny_lite 0.4 "
                        "as MAE-Lite, other Hiera 0.6)")
    p.add_argument("--recon-layer", type=int, default=None,
                   help="encoder block (1-indexed) whose normalised output the decoder reads "
                        "(none given: the last block)")
    p.add_argument("--decoder-dim", type=int, default=96,
                   help="decoder width (vit_small 192, larger models 512)")
    p.add_argument("--decoder-depth", type=int, default=1,
                   help="decoder blocks (larger models 8)")
    p.add_argument("--decoder-heads", type=int, default=3,
                   help="decoder heads (vit_small 6, larger models 16)")
    p.add_argument("--student-drop-path", type=float, default=0.0,
                   help="stochastic depth, the same rate on every encoder block but the last "
                        "(TinyMIM's student: 0.1)")
    p.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                   help="regress raw (normalised-image) pixels instead of per-patch normalised")
    g = p.add_argument_group("distillation from a teacher (see distill.py)")
    g.add_argument("--teacher", default=None,
                   help="teacher: a checkpoint (FAIR MAE, MAE-Lite, ours) or a published name ("
                        f"{weights.names_text()}; --list-weights), downloaded once into torch's "
                        "hub cache; enables distillation. None given with --distill-layer: the "
                        "papers' mae_vit_base on real data at 224 px, patch 16; on the synthetic "
                        "demo a vit_small MAE trained first into out/demo_teacher (beside "
                        "--out-dir), then reused")
    g.add_argument("--teacher-model", default="vit_base",
                   choices=model_names(),
                   help="teacher architecture (a published --teacher: its own; Hiera students: "
                        "hiera_base)")
    g.add_argument("--distill-target", default="attn", choices=["attn", "rep", "relation"],
                   help="attention maps (D-MAE), representations, or TinyMIM Q-K/V-V relations")
    g.add_argument("--distill-on", default="logits", choices=["logits", "probs"],
                   help="attention target: pre-softmax logits (published) or probabilities")
    g.add_argument("--distill-layer", type=block_list, default=None,
                   help="student blocks to distil, 1-indexed, comma-separated, e.g. 12 or 6,12 "
                        "(none given: the last block)")
    g.add_argument("--teacher-layer", type=block_list, default=None,
                   help="matching teacher blocks (none given: the papers' pairing: the same "
                        "index, TinyMIM's 18 of vit_large for relations, Hiera the same "
                        "relative depth)")
    g.add_argument("--distill-weight", type=float, default=1.0, help="weight of the distill loss")
    g.add_argument("--teacher-input", default="visible", choices=["visible", "full"],
                   help="teacher sees the student's visible patches, or the whole image "
                        "(TinyMIM; then only the visible tokens are compared)")
    g.add_argument("--no-recon", dest="recon_layer", action="store_const", const=0,
                   help="no reconstruction loss: distillation alone (the same as --recon-layer 0)")
    p.add_argument("--data", default="synthetic", choices=data.DATASETS, help="dataset")
    p.add_argument("--data-root", default=None, help="dataset folder (imagefolder: the folder "
                   "holding train/<class>/...)")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--loader", default="pil", choices=["pil", "device", "dali"],
                   help="pil: PIL decode + augment in workers; device: workers read bytes, JPEGs "
                        "decoded in batches (nvJPEG on CUDA) and augmented on the device; dali: "
                        "NVIDIA DALI decodes each crop's region and augments (pip install "
                        "nvidia-dali-cuda130) (device, dali: --data imagefolder / folder)")
    p.add_argument("--min-crop-scale", type=float, default=0.08,
                   help="smallest RandomResizedCrop area (MAE-Lite's for the lightweight models; "
                        "larger models 0.2, FAIR's)")
    p.add_argument("--crop-interpolation", default="random", choices=list(augment.INTERPOLATIONS),
                   help="RandomResizedCrop interpolation; random = bilinear or bicubic per image "
                        "(MAE-Lite's; larger models bicubic, FAIR's)")
    p.add_argument("--student-color-jitter", type=float, default=0.0,
                   help="ColorJitter(j, j, j) on the student's view only; the teacher sees the "
                        "same crop and flip without it (TinyMIM: 0.4)")
    p.add_argument("--synthetic-size", type=int, default=2000, help="images in synthetic train")
    p.add_argument("--max-images", type=int, default=None,
                   help="pre-train on at most this many training images, evenly spaced (none: "
                        "all)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per GPU per step (--data synthetic: 64)")
    p.add_argument("--accum-iter", type=int, default=1,
                   help="gradient accumulation steps (effective batch = batch * accum * GPUs)")
    p.add_argument("--epochs", type=int, default=400,
                   help="training epochs (--data synthetic: 8)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear warmup epochs (none given: 10%% of --epochs, the papers' 40 of "
                        "400; --data synthetic: 1)")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr * batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay, on every parameter but biases and norms (as the "
                        "papers' code: cls and mask tokens are decayed)")
    p.add_argument("--clip-grad", type=float, default=None,
                   help="clip the gradient norm to this value (none or 0: no clipping)")
    plumbing.add_run_flags(p, "out/mae")
    probe.add_monitor_flags(p)
    p.add_argument("--init", default=None,
                   help="warm start: weights of an encoder or encoder + decoder checkpoint (ours, "
                        "FAIR's, MAE-Lite's, timm's .safetensors) or a published name (e.g. "
                        "mae_vit_base_full; --list-weights), with a fresh optimizer and schedule "
                        "(unlike --resume)")
    p.add_argument("--list-weights", action=weights.ListWeights,
                   help="print the published weights --teacher and --init take by name "
                        "(architecture, source, licence) and exit")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle --init / --teacher files in full (only for files you trust: a "
                        "pickle can run code); by default only tensors and argparse.Namespace")
    p.add_argument("--save-every", type=int, default=20,
                   help="also keep checkpoint-<epoch>.pth every this many epochs")
    return p


# The synthetic demo is small enough for a laptop CPU (Hiera: 64 px, two mask units a side).
DEMO_DEFAULTS = dict(img_size=32, patch_size=4, batch_size=64, epochs=8, warmup_epochs=1)
WARMUP_FRACTION = 0.1  # --warmup-epochs not given: the papers' 40 of 400 epochs
# The architecture flags a warm start (--init) of one of our checkpoints takes from its run.
INIT_ARGS = ("model", "img_size", "patch_size", "decoder_dim", "decoder_depth", "decoder_heads",
             "norm_pix_loss")


def parse_args(argv=None):
    """Flags -> checked args, over layered defaults (plumbing.parse_layered): the model's paper
    defaults (PRETRAIN_DEFAULTS), a published teacher's architecture, the synthetic demo's
    sizes, an --init checkpoint's architecture; then --resume's run, then the command line."""
    parser = get_parser()

    def layers(given, typed):
        if given.auto_resume and given.resume and given.init:  # a relaunched warm start
            plumbing.print0(f"--resume auto: the run continues, so --init {given.init} is not "
                            "read")
            given.init = None
        source = {}  # ours or a published name: its architecture
        if given.init:
            source = weights.stated_args(given.init) or plumbing.checkpoint_args(given.init)
        source = {k: v for k, v in source.items() if k in INIT_ARGS}
        model = typed.get("model") or source.get("model") or parser.get_default("model")
        found = [PRETRAIN_DEFAULTS[model]]
        if given.teacher in weights.WEIGHTS:  # a published teacher names its architecture
            found.append(dict(teacher_model=weights.WEIGHTS[given.teacher]["model"]))
        if given.data == "synthetic":
            size = preset_facts(model)["demo_img_size"]
            found.append(dict(DEMO_DEFAULTS, **({"img_size": size} if size else {})))
        return found + [source]

    args, given = plumbing.parse_layered(parser, argv, "mae.py", layers)
    args.init = given.init
    plumbing.warmup_from_fraction(args, WARMUP_FRACTION)
    if args.teacher is None and (args.distill_layer or args.teacher_layer):
        teachers.default_teacher(args, parser, demo_defaults(parser))
    validate(args, parser)
    try:  # names -> files in the hub cache (downloaded once); from here on only paths
        args.init = weights.resolve(args.init, "--init")
        args.teacher = weights.resolve(args.teacher, "--teacher")
    except weights.WeightsError as e:
        sys.exit(f"error: {e}")
    return args


# The range of every numeric flag (plumbing.check_ranges); the rules between flags follow.
RANGES = {**plumbing.RUN_RANGES, "knn_every": "[0, inf)", "knn_images": "[1, inf)",
          "img_size": "[1, inf)", "patch_size": "[1, inf)", "decoder_dim": "[1, inf)",
          "decoder_depth": "[1, inf)", "decoder_heads": "[1, inf)", "batch_size": "[1, inf)",
          "accum_iter": "[1, inf)", "epochs": "[1, inf)", "save_every": "[1, inf)",
          "synthetic_size": "[1, inf)", "max_images": "[1, inf)", "blr": "(0, inf)",
          "lr": "(0, inf)", "min_lr": "[0, inf)", "weight_decay": "[0, inf)",
          "clip_grad": "[0, inf)", "min_crop_scale": "(0, 1]", "student_drop_path": "[0, 1)",
          "student_color_jitter": "[0, inf)", "distill_weight": "(0, inf)"}


def validate(args, parser):
    """Each flag's range (RANGES), then the rules that tie flags together, with a message that
    names the fix."""
    plumbing.check_ranges(parser, args, RANGES)
    facts = preset_facts(args.model)
    plumbing.check_run_flags(parser, args, facts["size_unit"])
    distill.check_flags(parser, args, facts)
    depth = facts["depth"]
    if not facts["decodes_any_block"] and args.recon_layer is not None:
        parser.error("--recon-layer / --no-recon are for ViT students; Hiera's MAE decodes the "
                     "fused stages")
    if args.init is not None and args.resume is not None:
        parser.error("--init starts a new run from weights and --resume continues a run: give "
                     "one of them")
    if args.mask_ratio == 0 and args.recon_layer != 0:
        parser.error("--mask-ratio 0 removes no patch, so there is nothing to reconstruct: use a "
                     "ratio in (0, 1) (MAE's: 0.75)")
    if args.recon_layer == 0 and args.teacher is None:
        parser.error("--no-recon / --recon-layer 0 leaves nothing to learn without --teacher")
    if args.recon_layer is not None and not 0 <= args.recon_layer <= depth:
        where = "is beyond" if args.recon_layer > depth else "is not a block of"
        parser.error(f"--recon-layer {args.recon_layer} {where} {args.model}'s {depth} blocks "
                     f"(choose 1..{depth})")
    if args.init in weights.WEIGHTS and weights.WEIGHTS[args.init]["model"] != args.model:
        parser.error(f"--init {args.init} is a {weights.WEIGHTS[args.init]['model']}: drop --model "
                     f"{args.model} (or give --model {weights.WEIGHTS[args.init]['model']})")
    unit, what = (facts["size_unit"], "mask units") if facts["size_unit"] else \
        (args.patch_size, "patches")
    slots = (args.img_size // unit) ** 2
    if not 0 <= args.mask_ratio < 1 or int(slots * (1 - args.mask_ratio)) < 1:
        parser.error(f"--mask-ratio {args.mask_ratio} must be in [0, 1) and keep at least one of "
                     f"the {slots} {what} of {unit} px in --img-size {args.img_size} (a larger "
                     "--img-size or a smaller ratio)")
    if args.decoder_dim % args.decoder_heads or args.decoder_dim % 4:
        parser.error(f"--decoder-dim {args.decoder_dim} must be divisible by --decoder-heads "
                     f"{args.decoder_heads} and by 4 (sin-cos position embedding)")
    if args.loader != "pil" and args.data not in ("imagefolder", "folder"):
        parser.error(f"--loader {args.loader} reads image files: use it with --data imagefolder "
                     "or --data folder")
    if args.max_images is not None and args.loader == "device":
        parser.error("--max-images works with --loader pil or dali")
    if args.loader != "pil" and args.student_color_jitter > 0:
        parser.error(f"--student-color-jitter needs --loader pil (the {args.loader} loader makes "
                     "one view per image)")
    if args.data_root is not None and not os.path.isdir(args.data_root):
        parser.error(f"--data-root {args.data_root} is not a folder")


def sample_images(args, count):
    """A few evaluation-transformed images for the reconstruction figure: validation split if
    there is one, else the training split."""
    try:
        dataset = data.build_dataset(args.data, args.data_root, "val",
                                     augment.eval_transform(args.img_size), False,
                                     args.synthetic_size, args.img_size)
    except data.DataError:
        dataset = data.build_dataset(args.data, args.data_root, "train",
                                     augment.eval_transform(args.img_size), False,
                                     args.synthetic_size, args.img_size)
    samples = (dataset[i] for i in range(min(count, len(dataset))))
    imgs = [s[0] for s in samples if s is not None]
    return torch.stack(imgs) if imgs else torch.empty(0)


def write_figures(args, student, device):
    """The run's pictures (viewers.py draws them): curves.png of log.jsonl, and
    reconstruction.png of 8 validation images when the decoder was trained."""
    written = ["curves.png"] if viewers.write_run_curves(args.out_dir) else []
    imgs = sample_images(args, 8)
    if student.recon_layer and len(imgs):  # no reconstruction when no decoder was trained
        viewers.reconstruction_figure(student, imgs.to(device), args.mask_ratio,
                                      os.path.join(args.out_dir, "reconstruction.png"))
        written.append("reconstruction.png")
    if written:
        plumbing.print0(f"wrote {' and '.join(written)} in {args.out_dir}")


ARCH_ARGS = ("model", "img_size", "patch_size", "decoder_dim", "decoder_depth", "decoder_heads",
             "recon_layer", "teacher_model", "distill_target", "distill_layer", "teacher_layer")


def build_training_module(args, device):
    """The module the loop trains: the MAE, or a DistilledMAE (student, frozen teacher and the
    distillation parts) when --teacher is given. Returns (module, student)."""
    student = build_mae(args.model, img_size=args.img_size, patch_size=args.patch_size,
                        decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                        decoder_heads=args.decoder_heads, norm_pix_loss=args.norm_pix_loss,
                        recon_layer=args.recon_layer)
    for block in student.blocks[:-1]:  # TinyMIM: a constant rate, none on the distilled last
        block.drop_path_rate = args.student_drop_path
    if args.teacher is None:
        return student.to(device), student
    teacher = distill.load_teacher(args.teacher, args.teacher_model, img_size=args.img_size,
                                   patch_size=args.patch_size,
                                   q_pool=getattr(student, "q_pool", 2),
                                   trust=args.trust_checkpoint)
    student_layers, teacher_layers = teachers.distill_layers(args)
    module = distill.DistilledMAE(student, teacher, student_layers, teacher_layers,
                                  target=args.distill_target, distill_on=args.distill_on,
                                  weight=args.distill_weight, teacher_input=args.teacher_input)
    plumbing.print0(f"distilling {args.distill_target} of student blocks {student_layers} "
                    f"from {args.teacher_model} blocks {teacher_layers}; reconstruction from "
                    f"block {student.recon_layer or 'none'}")
    return module.to(device), student


def warm_start(student, path, trust=False):
    """--init: the student's weights from any encoder or encoder + decoder checkpoint (through
    checkpoints.load_pretrained, which prints what it loaded); the optimizer and schedule start
    afresh.
    Says whether the decoder came from the file or starts from its initialisation."""
    report = load_pretrained(student, path, verbose=plumbing.is_main_process(), trust=trust)
    trained = {name for name, p in student.named_parameters() if p.requires_grad}
    decoder = [k for k in trained if k.startswith(DECODER_PREFIXES)]  # not the fixed sin-cos
    fresh = [k for k in decoder if k in report["initialised"]]
    where = ("the decoder starts from its initialisation" if len(fresh) == len(decoder) else
             "the decoder came from the file" if not fresh else
             f"{len(fresh)} of the decoder's {len(decoder)} tensors start from initialisation")
    name = path if isinstance(path, str) else "the state dict"
    plumbing.print0(f"--init {name}: the encoder came from the file; {where}; optimizer and "
                    "schedule start afresh")
    return report


# Parameters exempt from weight decay besides the 1-D ones: none, as the papers' code. Runs
# written before nanoMIM followed it exempted tokens and position embeddings; their
# checkpoints lack "no_decay_names" and resume with that rule, so the optimizer state fits.
NO_DECAY = ()


def checkpoint_state(module, student, optimizer, scaler, epoch, step, args, bad_images,
                     no_decay):
    """A plain dict: `model` holds the student MAE alone (FAIR keys, what fine-tuning loads);
    `distill` the head maps / extra blocks, needed only to resume pre-training."""
    state = {"model": student.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "args": vars(args),
             "no_decay_names": list(no_decay),
             **bad_images.state_dict()}  # skipped_images, seen_images
    if module is not student:
        state["distill"] = module.distill_state_dict()
    return state


def build_loader(args, device, rank, world_size):
    """(dataset, run loader) of the pre-training images: a data.Loader of uint8 crops (workers
    crop, the device normalises), the DeviceLoader (--loader device: workers read bytes, the
    device decodes and augments) or the DaliLoader (--loader dali). Workers live for the run."""
    if args.loader == "device":
        dataset = device_loader.DeviceLoader(
            args.data_root, args.batch_size, seed=args.seed, device=device, img_size=args.img_size,
            min_scale=args.min_crop_scale, rank=rank, world_size=world_size,
            num_workers=args.num_workers, interpolation=args.crop_interpolation, data=args.data)
        backend = device_loader.jpeg_backend()
        plumbing.print0(f"--loader device: JPEGs decoded by {backend}"
                        + (" (pip install torchcodec: torchvision's decoders are deprecated)"
                           if backend == "torchvision" else ""))
        return dataset, dataset
    transform = augment.pretrain_transform(args.img_size, args.min_crop_scale,
                                           args.crop_interpolation, args.student_color_jitter,
                                           uint8=args.loader == "pil")
    dataset = data.build_dataset(args.data, args.data_root, "train", transform, args.download,
                                 args.synthetic_size, args.img_size)
    dataset = data.evenly_spaced(dataset, args.max_images)
    if args.loader == "dali":  # DALI's graph; the pil path's transform for what it cannot decode
        graph = dali_loader.mae_graph(args.img_size, args.min_crop_scale, args.crop_interpolation)
        return dataset, dali_loader.DaliLoader(
            data.samples_of(dataset), args.batch_size, args.seed, device, graph, transform,
            (3, args.img_size, args.img_size), rank, world_size, args.num_workers)
    return dataset, data.Loader(dataset, args.batch_size, args.seed, rank=rank,
                                world_size=world_size, num_workers=args.num_workers,
                                pin_memory=device.type == "cuda")


def train(args):
    rank, world_size, device, precision, use_compile = plumbing.start_run(args)
    is_main = rank == 0
    log, last_path = loop.open_run(args, is_main)
    monitor = probe.knn_monitor(args) if is_main else None
    plumbing.seed_everything(args.seed)
    module, student = build_training_module(args, device)
    if args.init:
        warm_start(student, args.init, args.trust_checkpoint)
    dataset, run_loader = build_loader(args, device, rank, world_size)
    steps_per_epoch, eff_batch, lr = plumbing.steps_and_lr(args, len(dataset), world_size,
                                                           lr=args.lr)
    ckpt = loop.load_checkpoint(args.resume, args=args, same_args=ARCH_ARGS) if args.resume \
        else None
    no_decay = NO_DECAY if ckpt is None else tuple(ckpt["no_decay_names"])
    optimizer = torch.optim.AdamW(
        loop.param_groups(module, args.weight_decay, no_decay_names=no_decay), lr=lr,
        betas=(0.9, 0.95), fused=device.type == "cuda")
    scaler = plumbing.grad_scaler(precision, device)
    if ckpt is not None:
        student.load_state_dict(ckpt["model"])
        if module is not student:
            module.load_distill_state_dict(ckpt["distill"])
    start_epoch, step, bad_images = loop.resume_into(ckpt, args.resume, optimizer, scaler,
                                                     args.epochs)
    partial = student.recon_layer < student.depth  # some trainable weights may get no gradient
    model = plumbing.wrap_ddp(plumbing.maybe_compile(module, use_compile), device, partial)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    plumbing.print0(f"{args.model} MAE | {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M"
                    f" params | {args.data}: {len(dataset)} images, {args.img_size}px | device "
                    f"{device}, {precision}, compile {use_compile}, "
                    f"{plumbing.processes_text(world_size)} | "
                    f"batch {eff_batch}, lr {lr:.2e}, {total_steps} steps")

    losses = loop.LossLog(log, last_path, world_size)
    for epoch in range(start_epoch, args.epochs):
        bar = loop.epoch_batches(run_loader, args, epoch, steps_per_epoch, bad_images, rank)
        steps_before = step
        for it, (imgs, _) in enumerate(bar):
            if it % args.accum_iter == 0:
                loop.set_lr(optimizer, loop.cosine_lr(step, total_steps, warmup_steps, lr,
                                                      args.min_lr))
            imgs = imgs.to(device, non_blocking=True)
            if args.loader == "pil":  # the workers' uint8 crops
                imgs = augment.normalize(imgs)
            views = {}
            if imgs.ndim == 5:  # (B, 2, C, H, W): [teacher view, student view], TinyMIM
                views["teacher_imgs"], imgs = imgs.unbind(1)
            with plumbing.autocast(device, precision):
                out = model(imgs, args.mask_ratio, **views)
            scaler.scale(out["loss"] / args.accum_iter).backward()
            losses.add({k: v for k, v in out.items() if k.endswith("loss")}, imgs.shape[0])
            if (it + 1) % args.accum_iter:
                continue
            loop.optimizer_step(optimizer, args.clip_grad, scaler)
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                losses.write(step, epoch, optimizer, bar, bad_images)
        loop.end_epoch(losses, optimizer, step, steps_before, epoch, bad_images)
        if is_main:
            knn = probe.monitor_epoch(monitor, args, epoch, student, device, precision, log,
                                      step)
            state = checkpoint_state(module, student, optimizer, scaler, epoch, step, args,
                                     bad_images, no_decay)
            loop.save_epoch(state, args.out_dir, epoch, args.save_every,
                            final=epoch + 1 == args.epochs)
            plumbing.print0(f"epoch {epoch + 1}/{args.epochs} done, step {step}{knn}, "
                            f"skipped images {bad_images.skipped}, saved {last_path}")
    if is_main and start_epoch < args.epochs:  # else a finished run, resumed: nothing new
        write_figures(args, student, device)
        log.add_pictures(args.out_dir, step)
    plumbing.cleanup_distributed()


def demo_defaults(parser):
    """Each flag the demo teacher shares with the run (teachers.DEMO_TEACHER_FLAGS) -> the
    synthetic demo's default."""
    return {k: DEMO_DEFAULTS.get(k, parser.get_default(k)) for k in teachers.DEMO_TEACHER_FLAGS}


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.data == "synthetic" and args.teacher == teachers.demo_teacher_path(args.out_dir):
            teacher_argv = teachers.demo_teacher_to_train(args, demo_defaults(get_parser()))
            if teacher_argv:  # the demo's teacher first, then the student distilled from it
                train(parse_args(teacher_argv))
                plumbing.print0(f"demo teacher ready in {os.path.dirname(args.teacher)}; now "
                                "the student, distilled from it")
        train(args)
    except (data.DataError, CheckpointError, distill.DistillError, plumbing.RunError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
