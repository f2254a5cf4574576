"""loop.py: what the training loops of mae.py, moco.py and finetune.py share around the
forward, backward and step that each of them writes out: the lr schedule and the optimizer
step, resuming, the loss log, the end of an epoch and the crash-safe checkpoint.

Plain functions and one small class (LossLog); no Trainer. A loop reads:

    log, last_path = loop.open_run(args, is_main)
    ckpt = loop.load_checkpoint(args.resume, args=args, same_args=ARCH_ARGS) if args.resume \
        else None
    ...build the model and optimizer, load ckpt's model state...
    start_epoch, step, bad_images = loop.resume_into(ckpt, args.resume, optimizer, scaler,
                                                     args.epochs)
    losses = loop.LossLog(log, last_path, world_size)
    for epoch in range(start_epoch, args.epochs):
        bar = loop.epoch_batches(run_loader, args, epoch, steps_per_epoch, bad_images, rank)
        for it, (imgs, labels) in enumerate(bar):
            ...set the lr, forward, backward, optimizer step, losses.add / losses.write...
        loop.end_epoch(losses, optimizer, step, steps_before, epoch, bad_images)
        loop.save_epoch(state, args.out_dir, epoch, args.save_every, final=...)
"""
import itertools
import json
import math
import os
import re
import time

import torch
from tqdm import tqdm

import data
import plumbing
import viewers
from plumbing import RunError

# ----------------------------------------------------------------------------------------------
# Optimisation


def param_groups(model, weight_decay, lr_scale_of=None, no_decay_names=()):
    """Optimizer groups as the papers' code builds them: no weight decay on 1-D parameters
    (biases, norms) nor on the parameters whose names end with one of no_decay_names; every
    other parameter, tokens included, is decayed (pre-training: FAIR MAE, MAE-Lite and TinyMIM
    decay cls_token and mask_token; fine-tuning passes ("cls_token", "pos_embed"), timm's
    no_weight_decay).
    lr_scale_of(name) -> float sets a per-parameter lr scale (layer decay). Frozen parameters
    are left out."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(tuple(no_decay_names))
        scale = lr_scale_of(name) if lr_scale_of else 1.0
        key = (no_decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale}
        groups[key]["params"].append(p)
    return list(groups.values())


def cosine_lr(step, total_steps, warmup_steps, base_lr, min_lr=0.0):
    """Linear warmup from 0 for warmup_steps, then half-cosine decay to min_lr (per step)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def optimizer_step(optimizer, clip_grad=None, scaler=None):
    """Clip the gradient norm of all the optimizer's parameters to clip_grad (None or 0: no
    clipping), take the step, zero the gradients. With a GradScaler (fp16) the gradients are
    unscaled before clipping, and a step whose gradients overflowed is skipped by the scaler."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def current_lr(optimizer):
    """The schedule's lr (a group's lr divided by its layer-decay scale)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def check_finite(loss_value, step, checkpoint_path):
    if not math.isfinite(loss_value):
        kept = (f"; {checkpoint_path} still holds the last good checkpoint"
                if os.path.exists(checkpoint_path) else "")
        raise RunError(f"loss is {loss_value} at step {step}: training diverged; lower the "
                       f"learning rate (--blr), lengthen --warmup-epochs or try --precision fp32"
                       f"{kept}")


# ----------------------------------------------------------------------------------------------
# The run: its folder, log, resume, epochs and checkpoints


def save_checkpoint(obj, path):
    """torch.save to a temporary file, fsync, then rename: a crash never corrupts `path`."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, required=("model", "optimizer", "epoch", "step", "args"), args=None,
                    same_args=()):
    """Read a training checkpoint of ours for --resume; a clear error if it is not one, or if it
    was trained with other values of the flags named in same_args (compared with `args`)."""
    if os.path.isdir(path):
        raise RunError(f"--resume {path} is a folder: give its checkpoint.pth, or --out-dir "
                       f"{path} --resume auto")
    if not os.path.isfile(path):
        raise RunError(f"checkpoint {path} does not exist: check --resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"cannot read {path} ({type(e).__name__}): the file is damaged or not a "
                       "nanoMIM checkpoint; resume from an earlier checkpoint-<epoch>.pth") \
            from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RunError(f"{path} is not a nanoMIM training checkpoint (no {', '.join(missing)}); "
                       "--resume continues our own runs only")
    ckpt = plumbing.upgrade_checkpoint(ckpt)
    changed = [a for a in same_args if ckpt["args"].get(a) != getattr(args, a)]
    if changed:
        raise RunError(f"--resume {path} was trained with different {', '.join(changed)}; pass "
                       "the same flags as that run")
    return ckpt


class JsonlLog:
    """Appends one JSON object per line to `path` (rank 0 only). tensorboard=True also writes
    each record's numbers as TensorBoard scalars at its `step`, in the same folder (the JSONL
    stays the record), and add_pictures() the run's PNGs."""

    def __init__(self, path, enabled=True, tensorboard=False):
        self.path = path
        self.enabled = enabled
        self.board = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # checked by check_tensorboard

            self.board = SummaryWriter(log_dir=os.path.dirname(path) or ".")

    def write(self, **record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])
            self.board.flush()

    def add_pictures(self, folder, step):
        """The run's end-of-run pictures (curves.png, reconstruction.png, ...) as TensorBoard
        images."""
        if self.board is None:
            return
        import numpy as np
        from PIL import Image

        for name in sorted(os.listdir(folder)):
            if name.endswith(".png"):
                with Image.open(os.path.join(folder, name)) as img:
                    pixels = np.asarray(img.convert("RGB"))
                self.board.add_image(name[:-4], pixels, step, dataformats="HWC")
        self.board.flush()


# What a run of ours writes in its folder: what a new run with --overwrite deletes
RUN_FILE = re.compile(r"checkpoint(-\d+)?\.pth|best\.pth|log\.jsonl|events\.out\.tfevents\..+")


def clear_run(out_dir, keep=()):
    """Delete an earlier run's files in out_dir (RUN_FILE: its checkpoints, log and TensorBoard
    events), except the paths in `keep` (this run's --init or --teacher); other files and
    sub-folders (other runs) are left."""
    keep = {os.path.realpath(k) for k in keep if k}
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if RUN_FILE.fullmatch(name) and os.path.isfile(path) and os.path.realpath(path) not in keep:
            os.remove(path)


def open_run(args, is_main):
    """(the run's JsonlLog, the path of its checkpoint.pth); makes --out-dir. A new run (no
    --resume) starts its log afresh; with --overwrite it first deletes the earlier run's files
    (clear_run), so nothing of it is mixed in. (plumbing.check_new_run has refused a new run over
    an earlier one without --overwrite, and a log alone without --resume auto.)"""
    os.makedirs(args.out_dir, exist_ok=True)
    if is_main and not args.resume:
        if args.overwrite:
            clear_run(args.out_dir, keep=(getattr(args, "init", None),
                                          getattr(args, "teacher", None)))
        elif os.path.isfile(os.path.join(args.out_dir, "log.jsonl")):
            os.remove(os.path.join(args.out_dir, "log.jsonl"))
    log = JsonlLog(os.path.join(args.out_dir, "log.jsonl"), enabled=is_main,
                   tensorboard=args.tensorboard)
    return log, os.path.join(args.out_dir, "checkpoint.pth")


def resume_into(ckpt, path, optimizer, scaler, epochs):
    """Load a --resume checkpoint's optimizer and scaler state (the caller loads its model):
    returns (first epoch, step, data.BadImages) to continue from; (0, 0, none) when ckpt is
    None, a new run. A run that had finished its `epochs` is said to have nothing to train (the
    caller then trains nothing and redraws nothing)."""
    if ckpt is None:
        return 0, 0, data.BadImages()
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and scaler.is_enabled():  # an fp32/bf16 run saved an empty one
        scaler.load_state_dict(ckpt["scaler"])
    plumbing.print0(f"resumed from {path} at epoch {ckpt['epoch'] + 1}, step {ckpt['step']}")
    if ckpt["epoch"] + 1 >= epochs:
        plumbing.print0(f"--resume {path}: its run had finished its {ckpt['epoch'] + 1} epochs "
                        f"(--epochs {epochs}); nothing to train (raise --epochs to train longer)")
    return ckpt["epoch"] + 1, ckpt["step"], data.BadImages(ckpt["skipped_images"],
                                                           ckpt["seen_images"])


def epoch_batches(run_loader, args, epoch, steps_per_epoch, bad_images, rank):
    """Epoch `epoch`'s steps_per_epoch * accum_iter batches of a data.Loader, with a progress
    bar on rank 0; the epoch's random state is seeded first (so --resume is exact)."""
    plumbing.seed_everything(args.seed, epoch, rank)
    total = steps_per_epoch * args.accum_iter
    return tqdm(itertools.islice(run_loader.epoch(epoch, bad_images), total), total=total,
                desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0, leave=False)


class LossLog:
    """The mean of each loss since the last log line, over every process. add() each
    micro-batch's losses (a dict of 0-dim tensors, "loss" first); write() on a logging step
    (one host sync; the mean loss must be finite; lr, images/s and skipped images go with it);
    check_rest() at the end of an epoch, for the steps not yet logged."""

    def __init__(self, log, last_path, world_size):
        self.log, self.last_path, self.world_size = log, last_path, world_size
        self.reset()

    def reset(self):
        self.sums, self.count, self.images, self.t0 = 0, 0, 0, time.time()

    def add(self, losses, images):
        self.names = list(losses)
        self.sums = self.sums + torch.stack([v.detach().float() for v in losses.values()])
        self.count += 1
        self.images += images

    def means(self, step):
        means = dict(zip(self.names, plumbing.all_reduce_mean(self.sums / self.count).tolist()))
        check_finite(means["loss"], step, self.last_path)
        return means

    def write(self, step, epoch, optimizer, bar, bad_images, **extra):
        means = self.means(step)
        rate = self.images * self.world_size / (time.time() - self.t0)
        self.log.write(step=step, epoch=epoch + 1, **means, lr=current_lr(optimizer), **extra,
                       images_per_s=rate, skipped_images=bad_images.skipped)
        bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{rate:.0f}")
        self.reset()

    def check_rest(self, step):
        if self.count:
            self.means(step)
            self.reset()


def end_epoch(losses, optimizer, step, steps_before, epoch, bad_images):
    """After an epoch's last batch: no unfinished gradient accumulation leaks into the next
    epoch, the epoch read enough images, and its last losses are finite."""
    optimizer.zero_grad(set_to_none=True)
    data.check_epoch_read(step - steps_before, epoch, bad_images)
    losses.check_rest(step)


def save_epoch(state, out_dir, epoch, save_every, final=False):
    """checkpoint.pth after every epoch, and checkpoint-<epoch>.pth every save_every epochs (0:
    never) and, with final, after the run's last epoch. Returns the checkpoint.pth path."""
    last_path = os.path.join(out_dir, "checkpoint.pth")
    save_checkpoint(state, last_path)
    if (save_every and (epoch + 1) % save_every == 0) or final:
        save_checkpoint(state, os.path.join(out_dir, f"checkpoint-{epoch + 1}.pth"))
    return last_path


def finish_run(out_dir, log, step):
    """The end-of-run curves.png, and every picture of the run into TensorBoard."""
    if viewers.write_run_curves(out_dir):
        plumbing.print0(f"wrote {os.path.join(out_dir, 'curves.png')}")
    log.add_pictures(out_dir, step)


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
                    w_norm = torch.norm(p)
                    u_norm = torch.norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0),
                                        g["trust_coefficient"] * w_norm / u_norm, 1.0)
                    update = update * trust
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(update)
                p.add_(buf, alpha=-g["lr"])
