"""plumbing.py: the run machinery that mae.py and finetune.py share, written once.

Device and precision, torch.compile, DDP under torchrun, seeding, AdamW parameter groups,
the warmup + cosine schedule, atomic checkpoints and the JSONL log.
"""
import argparse
import contextlib
import math
import os
import random
import re
import tempfile

import torch
import torch.distributed as dist


class RunError(RuntimeError):
    """A run that cannot go on (diverged loss, incompatible resume); the message names the fix."""


# ----------------------------------------------------------------------------------------------
# Processes, devices, precision


def default_device():
    """The device every script uses: this process's CUDA GPU, else mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_distributed():
    """Returns (rank, world_size, device). Uses DDP when launched by torchrun (one process too,
    so `torchrun --nproc_per_node 1` runs the multi-GPU code path): NCCL on CUDA, gloo on CPU.
    The device is default_device()."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    launch = "launch with torchrun --nproc_per_node N (it sets them all), or unset them"
    if not 0 <= rank < world_size:
        raise RunError(f"the environment says RANK={rank} of WORLD_SIZE={world_size}: {launch}")
    launched = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if launched and missing and not dist.is_initialized():
        raise RunError(f"WORLD_SIZE={world_size} asks for several processes but "
                       f"{' and '.join(missing)} is not set: {launch}")
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched and not dist.is_initialized():
        if rank == 0:  # init_process_group waits, silently, until every process has joined
            print(f"waiting for the {world_size} processes at {os.environ['MASTER_ADDR']}:"
                  f"{os.environ['MASTER_PORT']} to join", flush=True)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def start_run(args):
    """How every training script starts (mae.py, finetune.py, moco.py): processes and device
    (setup_distributed), --deterministic, the processes' agreement on --resume, and the
    precision and compile setting to run. Returns (rank, world_size, device, precision,
    use_compile)."""
    rank, world_size, device = setup_distributed()
    use_deterministic(args.deterministic)
    check_same_resume(args.resume)
    precision = resolve_precision(args.precision, device)
    return rank, world_size, device, precision, compile_wanted(args.compile, device)


def steps_and_lr(args, num_images, world_size, lr=None):
    """The schedule's arithmetic every training script shares: optimizer steps per epoch, the
    effective batch (batch x accum-iter x processes) and the lr, `lr` if given else the
    papers' rule blr x effective batch / 256 (checked against --min-lr). Fewer images than
    one step takes stop the run with a RunError naming the fix."""
    eff_batch = args.batch_size * args.accum_iter * world_size
    steps_per_epoch = num_images // eff_batch
    if steps_per_epoch < 1:
        raise RunError(f"{num_images} images are fewer than one step needs ({eff_batch}); "
                       "lower --batch-size or --accum-iter")
    lr = lr if lr is not None else args.blr * eff_batch / 256
    check_min_lr(args.min_lr, lr)
    return steps_per_epoch, eff_batch, lr


def processes_text(world_size):
    """'2 process(es) (DDP over nccl)' for the scripts' start-up line."""
    backend = f" (DDP over {dist.get_backend()})" if dist.is_initialized() else ""
    return f"{world_size} process(es){backend}"


def use_deterministic(enabled):
    """--deterministic: deterministic kernels only (torch.use_deterministic_algorithms, cuBLAS's
    fixed workspace, no cuDNN autotuning), so that on a GPU a resumed run repeats the
    uninterrupted one step for step (on the CPU it already does). Slower; an op with no
    deterministic kernel stops the run with PyTorch's message naming it."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first use
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def check_same_resume(resume):
    """Under torchrun every process must resume from the same file or none (--resume auto looks
    for it on each node: an out-dir that is not shared would split the run)."""
    if not dist.is_initialized():
        return
    paths = [None] * dist.get_world_size()
    dist.all_gather_object(paths, resume)
    if len(set(paths)) > 1:
        found = ", ".join(sorted(map(str, set(paths))))
        raise RunError(f"the processes disagree on the checkpoint to resume ({found}): put "
                       "--out-dir on storage every node sees")


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """Print on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def add_run_flags(parser, out_dir):
    """The flags every training script shares (mae.py, finetune.py, moco.py): data workers,
    precision, compile, output folder, --resume (with auto), logging and seed."""
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="data-loading processes per GPU")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast precision (auto: bf16 on GPUs that have it, fp16 with "
                             "loss scaling on older GPUs, fp32 on CPU)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="torch.compile the model (auto: on for CUDA)")
    parser.add_argument("--out-dir", default=out_dir,
                        help="checkpoints, log.jsonl and the run's pictures")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --out-dir that holds an earlier run, "
                             "deleting that run's checkpoints, log and TensorBoard events (not "
                             "this run's --init / --teacher, not runs in sub-folders); without "
                             "it such a run stops (finetune.py --export: replace an earlier "
                             "export)")
    parser.add_argument("--resume", default=None,
                        help="continue a run exactly from a checkpoint.pth; flags not given take "
                             "its run's (auto: --out-dir's if there is one, else start)")
    parser.add_argument("--log-every", type=int, default=20, help="log every this many steps")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard scalars and the end-of-run pictures into "
                             "--out-dir (pip install tensorboard; then tensorboard --logdir DIR)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                        help="deterministic GPU kernels (slower): a resumed run then repeats "
                             "the uninterrupted one exactly on a GPU too (a resume keeps the "
                             "run's setting unless given)")


# The ranges of add_run_flags' numeric flags (check_ranges).
RUN_RANGES = {"num_workers": "[0, inf)", "log_every": "[1, inf)", "seed": "[0, 4294967295]"}


def compile_wanted(setting, device):
    """--compile on, or auto on a CUDA device."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def resolve_precision(precision, device):
    """The autocast precision to run: 'auto' is bf16 on a CUDA GPU that computes it natively
    (Ampere and newer), fp16 with loss scaling on older GPUs (V100, T4, which lack bf16), fp32
    elsewhere. bf16 asked of a GPU without it is refused; fp16 runs on any device torch has it
    for (with grad_scaler's loss scaling)."""
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if native_bf16 else "fp16"
    if precision == "bf16" and device.type == "cuda" and not native_bf16:
        raise RunError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16: use "
                       "--precision fp16 (with loss scaling) or fp32")
    return precision


def grad_scaler(precision, device):
    """fp16 gradients underflow without loss scaling: a GradScaler, enabled for fp16 only (a
    pass-through otherwise). Saved in checkpoints as "scaler" so a resume continues its scale."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def autocast(device, precision):
    """The forward-pass context for a resolved precision (fp32, bf16 or fp16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def maybe_compile(model, enabled, mode=None):
    """torch.compile the module when asked (mode: torch.compile's, e.g. "reduce-overhead" for
    CUDA graphs); callers keep the un-compiled one for saving."""
    return torch.compile(model, mode=mode) if enabled else model


def wrap_ddp(model, device, find_unused=False):
    """DDP under torchrun; find_unused for layouts where some trainable parameters get no
    gradient in a step (blocks after the reconstruction layer, a distilled block's MLP)."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None, find_unused_parameters=find_unused)


def all_reduce_mean(tensor):
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def run_seed(seed, epoch=0, rank=0):
    """The one seed of (run seed, epoch, rank): the loops reseed torch with it every epoch and the
    loaders shuffle with it, so a run resumed at an epoch boundary draws the same data order,
    augmentations and masks as an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2 ** 63


def seed_everything(seed, epoch=0, rank=0):
    """Seed torch (CPU and CUDA) and Python with run_seed(seed, epoch, rank)."""
    value = run_seed(seed, epoch, rank)
    torch.manual_seed(value)
    random.seed(value)


def check_ranges(parser, args, ranges):
    """Stop with parser.error (one line, exit 2) on the first flag outside its range. ranges maps
    an args name to an interval written as in mathematics, "[0, 1)", "(0, inf)"; None passes (not
    given), a list is checked value by value, nan and inf never pass."""
    for name, interval in ranges.items():
        low, high = (float(x) for x in interval[1:-1].split(","))
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            inside = (low < v or (interval[0] == "[" and v == low)) and \
                     (v < high or (interval[-1] == "]" and v == high))
            if not (math.isfinite(v) and inside):
                rule = (f"in {interval}" if high != math.inf else
                        f"at least {low:g}" if interval[0] == "[" else f"greater than {low:g}")
                parser.error(f"--{name.replace('_', '-')} {v} must be {rule}")


def check_min_lr(min_lr, lr):
    """The cosine must fall from the peak lr to --min-lr, not rise to it."""
    if min_lr > lr:
        raise RunError(f"--min-lr {min_lr:g} is above the peak lr {lr:.3g}: the schedule would "
                       "rise instead of decay; lower --min-lr")


def checkpoint_script(stored):
    """Which of our scripts wrote a checkpoint, from its args: finetune.py's name a recipe,
    mae.py's a mask ratio, moco.py's a temperature; None for anything else."""
    for script, key in (("finetune.py", "recipe"), ("mae.py", "mask_ratio"),
                        ("moco.py", "temperature")):
        if key in stored:
            return script
    return None


def check_resume_script(parser, path, script):
    """--resume of another script's checkpoint stops, naming that script and --init."""
    other = checkpoint_script(checkpoint_args(path)) if os.path.isfile(path) else None
    if other is not None and other != script:
        parser.error(f"--resume {path} is a {other} checkpoint: continue it with {other}, or "
                     "start from its weights with --init")


def check_out_dir(parser, path, flag="--out-dir"):
    """An output folder that is an existing file, or that cannot be created or written, stops at
    once (one line), not at the first save. The check writes a file there and removes what it
    made (the run makes its folder when it starts); under torchrun only rank 0 probes, so the
    ranks do not race on one folder."""
    if not path:
        parser.error(f"{flag} is empty: give a folder (it will be created if missing)")
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{flag} {path} is a file: give a folder (it will be created if missing)")
    path = os.path.abspath(path)  # normalised: "a/../b" makes only b
    existing = path  # the nearest part of the path that exists
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.error(f"{flag} {path} cannot be created ({existing} is a file): choose a folder")
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:  # os.access says yes to root even where nothing can be written (/proc, read-only mounts)
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        parser.error(f"{flag} {path} cannot be created or written ({e.strerror}): choose a "
                     "writable folder")
    finally:
        made = path
        while made != existing and os.path.isdir(made) and not os.listdir(made):
            try:
                os.rmdir(made)
            except OSError:  # someone else's file appeared in it meanwhile: leave it
                break
            made = os.path.dirname(made)


def earlier_checkpoints(out_dir):
    """The checkpoint files an earlier run left in out_dir and in its sub-folders (a sweep's
    lr<value>/), relative to out_dir."""
    found = []
    for folder, _, files in os.walk(out_dir):
        found += [os.path.relpath(os.path.join(folder, f), out_dir) for f in files
                  if f.endswith(".pth")]
    return sorted(found)


def check_new_run(parser, args):
    """A new run (no --resume) into a folder that holds an earlier run's checkpoints or log
    stops with one line naming the choices, unless --overwrite: a finished run is never
    replaced silently, nor a new log appended to an old one. --resume auto that found no
    checkpoint.pth may replace a log alone (a relaunched job stopped before its first save)."""
    check_out_dir(parser, args.out_dir)
    check_tensorboard(parser, args)
    if args.resume or args.overwrite:
        return
    found = earlier_checkpoints(args.out_dir)
    logs = sorted(os.path.relpath(os.path.join(folder, "log.jsonl"), args.out_dir)
                  for folder, _, files in os.walk(args.out_dir) if "log.jsonl" in files)
    if not found and logs:  # a run (or a sweep's) stopped before its first save
        if getattr(args, "auto_resume", False):
            return
        parser.error(f"--out-dir {args.out_dir} holds an earlier run's {', '.join(logs[:3])} but "
                     "no checkpoint (a run stopped before its first save): start afresh over it "
                     "with --resume auto or --overwrite, or choose another --out-dir")
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        epochs = [int(m[1]) for m in map(re.compile(r"checkpoint-(\d+)\.pth").fullmatch, found)
                  if m]  # the numbered saves of this folder, not of a sweep's sub-folders
        cont = "--resume auto" if "checkpoint.pth" in found else None
        if cont is None and epochs:
            cont = f"--resume {os.path.join(args.out_dir, f'checkpoint-{max(epochs)}.pth')}"
        parser.error(f"--out-dir {args.out_dir} holds an earlier run's checkpoints ({shown}): "
                     + (f"continue it with {cont}, " if cont else "")
                     + "choose another --out-dir, or replace it with --overwrite")


def check_run_flags(parser, args, size_unit=None, writes_checkpoints=True):
    """The rules every training script shares, each with one line naming the fix: a new run
    never replaces an earlier one (check_new_run), the images fit the patches (size_unit: the
    model's own multiple, Hiera's 32 px, else --patch-size), the warmup fits the run, data on
    disk has a root."""
    if writes_checkpoints:
        check_new_run(parser, args)
    else:
        check_out_dir(parser, args.out_dir)
    if size_unit and args.img_size % size_unit:
        parser.error(f"--img-size {args.img_size} must be a multiple of {size_unit} for "
                     f"{args.model}")
    if not size_unit and args.img_size % args.patch_size:
        parser.error(f"--img-size {args.img_size} is not a multiple of --patch-size "
                     f"{args.patch_size}")
    if not 0 <= args.warmup_epochs <= args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs} must be within 0..--epochs "
                     f"{args.epochs}")
    if args.data not in ("synthetic", "fashion_mnist") and args.data_root is None:
        parser.error(f"--data {args.data} needs --data-root (the folder that holds the data)")


# ----------------------------------------------------------------------------------------------
# Optimisation


# ----------------------------------------------------------------------------------------------
# Checkpoints and logs


def checkpoint_args(path):
    """The `args` dict stored in one of our checkpoints, {} for any other or unreadable file.
    The file is memory-mapped, so its tensors are not read (parse_args asks several times)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # a file torch cannot map (the pre-zip format) is read whole
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return {}
    stored = ckpt.get("args") if isinstance(ckpt, dict) else None
    return stored if isinstance(stored, dict) else {}


def upgrade_args(stored):
    """The args of a checkpoint written by an earlier nanoMIM, as this one names them: flags
    added since get the value a run without them had, and a fine-tuning run's single --lr
    becomes the one-element list --lr now is."""
    stored = {"crop_interpolation": "bicubic", **stored}
    if isinstance(stored.get("lr"), float) and "recipe" in stored:  # finetune.py's, pre-list
        stored["lr"] = [stored["lr"]]
    return stored


# The no-decay names of MAE runs from before the optimizer's groups were recorded with them.
LEGACY_NO_DECAY = ("token", "pos_embed")
# The distillation parts' names before they were grouped ("12.head_map" is now head_maps.12).
LEGACY_DISTILL_PARTS = {"head_map": "head_maps", "rep_map": "rep_maps", "extra": "extra_blocks"}


def upgrade_checkpoint(ckpt):
    """A training checkpoint written by an earlier nanoMIM, in this one's layout (every rule of
    compatibility is here): its args (upgrade_args); an MAE run's no-decay names, recorded since
    its tokens are decayed; the distillation parts under their group names."""
    ckpt = dict(ckpt, args=upgrade_args(ckpt["args"]))
    if "mask_ratio" in ckpt["args"] and "no_decay_names" not in ckpt:  # mae.py's, older
        ckpt["no_decay_names"] = list(LEGACY_NO_DECAY)
    if "distill" in ckpt:
        renamed = {}
        for key, value in ckpt["distill"].items():
            layer, part, *rest = key.split(".")
            if layer.isdigit():  # the earlier layout: "12.head_map" -> "head_maps.12"
                key = ".".join([LEGACY_DISTILL_PARTS[part], layer, *rest])
            renamed[key] = value
        ckpt["distill"] = renamed
    return ckpt


def resumed_defaults(path, names, never=("resume", "auto_resume", "out_dir", "init", "export",
                                         "eval")):
    """--resume continues a run: the defaults of the flags `names` become the values the
    checkpoint's run used (upgrade_args), so that a change of nanoMIM's defaults never changes
    a run half-way. {} for an unreadable file (the resume itself then says what is wrong)."""
    stored = checkpoint_args(path) if os.path.isfile(path) else {}
    if not stored:
        return {}
    return {k: v for k, v in upgrade_args(stored).items() if k in names and k not in never}


def parse_layered(parser, argv, script, layers):
    """Every script's parse, in one pass over layered defaults (the later wins): the parser's
    own, then each dict of layers(given, typed) (model preset, demo sizes, an --init file's
    architecture, ...), then the flags of the run --resume continues, then the command line.
    given: the command line over the parser's defaults, with --resume auto resolved to a path
    or None (given.auto_resume says it was auto); typed: only the flags typed, as a dict.
    Returns (args, given)."""
    given, _ = parser.parse_known_args(argv)
    typed, _ = parser.parse_known_args(argv, argparse.Namespace(**{
        a.dest: None for a in parser._actions if a.dest != "help"}))
    typed = {k: v for k, v in vars(typed).items() if v is not None}
    given.auto_resume = given.resume == "auto"
    given.resume = resolve_resume(given.resume, given.out_dir)
    for layer in layers(given, typed):
        parser.set_defaults(**layer)
    if given.resume:  # last, so that a resumed run keeps every value it had
        check_resume_script(parser, given.resume, script)
        parser.set_defaults(**resumed_defaults(given.resume, vars(given)))
        print0(f"--resume: flags not given take the values of the run that wrote {given.resume}")
    args = parser.parse_args(argv)
    args.resume, args.auto_resume = given.resume, given.auto_resume
    return args, given


def resolve_resume(resume, out_dir):
    """--resume auto: continue from out_dir/checkpoint.pth when it exists (a preempted job
    relaunched with the same command), else start afresh (None). Any other value is a path."""
    if resume != "auto":
        return resume
    path = os.path.join(out_dir, "checkpoint.pth")
    if os.path.isfile(path):
        print0(f"--resume auto: continuing from {path}")
        return path
    print0(f"--resume auto: no {path} yet, starting a new run")
    return None


def warmup_from_fraction(args, fraction):
    """--warmup-epochs not given: the recipe's fraction of --epochs (MAE: 40 of 400, 10%), so a
    short run keeps the recipe's shape instead of failing on a warmup longer than the run."""
    if args.warmup_epochs is None:
        args.warmup_epochs = round(fraction * args.epochs)


def check_tensorboard(parser, args):
    """--tensorboard needs the optional tensorboard package: one line if it is missing."""
    if getattr(args, "tensorboard", False):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            parser.error("--tensorboard needs the tensorboard package: pip install tensorboard")
