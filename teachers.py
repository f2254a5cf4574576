"""teachers.py: the teacher a distillation run gets when --teacher is not given, and the
teacher blocks each distilled student block is paired with.

mae.py asks default_teacher after parsing its flags: on real data at the papers' size it names
the published MAE of --teacher-model (mae_vit_base, the papers' teacher); on the synthetic
demo it points at a small MAE that mae.py pre-trains first, on the same images
(demo_teacher_to_train says whether one is needed and with which flags).
"""
import os
import shlex

import torch

import distill
import plumbing
import weights
from presets import build_mae, build_model, preset_facts


# The teacher the synthetic demo trains for itself (default_teacher): the papers' teacher sees
# 224-px images in 16-px patches and cannot see the demo's 32-px images in 4-px patches.
DEMO_TEACHER_MODEL = "vit_small"
# The run's flags the demo teacher takes, so that it sees the same images in the same patches.
DEMO_TEACHER_FLAGS = ("img_size", "patch_size", "synthetic_size", "batch_size", "num_workers",
                      "precision", "compile", "knn_every")


def demo_teacher_dir(out_dir):
    """Beside the run's --out-dir: out/demo_teacher for the default out/mae."""
    return os.path.join(os.path.dirname(os.path.normpath(out_dir)), "demo_teacher")


def demo_teacher_path(out_dir):
    return os.path.join(demo_teacher_dir(out_dir), "checkpoint.pth")


def demo_teacher_argv(args, demo_defaults):
    """The demo teacher's mae.py flags: DEMO_TEACHER_MODEL, its folder, and the run's
    DEMO_TEACHER_FLAGS that differ from the demo's defaults (demo_defaults: flag -> value)."""
    argv = ["--model", DEMO_TEACHER_MODEL, "--out-dir", demo_teacher_dir(args.out_dir)]
    for key in DEMO_TEACHER_FLAGS:
        if getattr(args, key) != demo_defaults[key]:
            argv += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return argv


def default_teacher(args, parser, demo_defaults):
    """--distill-layer / --teacher-layer without --teacher: a teacher that fits, said in the
    run's first lines. Real data at the papers' size: the published MAE of --teacher-model
    (mae_vit_base: the papers' teacher); the synthetic demo: a DEMO_TEACHER_MODEL MAE that
    mae.py pre-trains on the same data into demo_teacher_dir (once, then reused); anything
    else: one line naming the fix (parser.error)."""
    if preset_facts(args.model)["family"] != "vit":  # the published and demo teachers are ViTs
        parser.error("--distill-layer needs --teacher for a Hiera student: a Hiera MAE checkpoint "
                     "with --teacher-model hiera_* (no Hiera weights are published by name)")
    if args.data == "synthetic":
        args.teacher = demo_teacher_path(args.out_dir)
        args.teacher_model = DEMO_TEACHER_MODEL
        plumbing.print0(
            f"--distill-layer without --teacher: the papers' teacher (mae_vit_base, 224-px images "
            f"in 16-px patches) cannot see the synthetic demo's {args.img_size}-px images in "
            f"{args.patch_size}-px patches, so the teacher is a {DEMO_TEACHER_MODEL} MAE "
            f"pre-trained on the same images into {os.path.dirname(args.teacher)} (once; later "
            f"runs reuse it). By hand: python mae.py "
            f"{shlex.join(demo_teacher_argv(args, demo_defaults))}, then add --teacher "
            f"{args.teacher} --teacher-model {DEMO_TEACHER_MODEL}")
        return
    published = [n for n, w in weights.WEIGHTS.items() if w["model"] == args.teacher_model]
    if not published:
        parser.error(f"--distill-layer needs --teacher: no published weight is a --teacher-model "
                     f"{args.teacher_model} ({weights.names_text()} are vit_base / vit_large); "
                     "give a checkpoint's path")
    name = published[0]
    entry = weights.WEIGHTS[name]
    if (args.img_size, args.patch_size) != (entry["img_size"], entry["patch_size"]):
        parser.error(f"--distill-layer needs --teacher: the papers' teacher {name} sees "
                     f"{entry['img_size']}-px images in {entry['patch_size']}-px patches, this run "
                     f"{args.img_size}-px images in {args.patch_size}-px patches; use --img-size "
                     f"{entry['img_size']} --patch-size {entry['patch_size']}, or give --teacher a "
                     "checkpoint at this size (pre-train one: python mae.py --model vit_small "
                     f"--img-size {args.img_size} --patch-size {args.patch_size} and your --data "
                     "flags --out-dir out/teacher)")
    args.teacher = name
    plumbing.print0(f"--distill-layer without --teacher: distilling from the papers' teacher, "
                    f"--teacher {name} --teacher-model {args.teacher_model}: {entry['what']} "
                    f"({entry['licence']}, {entry['url']})")


def distill_layers(args):
    """(student blocks, teacher blocks) to distil: --distill-layer (none given: the last block)
    and --teacher-layer (none given: the papers' pairing, distill.default_teacher_layer)."""
    facts = preset_facts(args.model)
    depth, t_depth = facts["depth"], preset_facts(args.teacher_model)["depth"]
    student = args.distill_layer or [depth]
    teacher = args.teacher_layer or [
        distill.default_teacher_layer(s, depth, t_depth, args.distill_target,
                                      facts["pair_by_relative_depth"]) for s in student]
    return student, teacher


def demo_teacher_to_train(args, demo_defaults):
    """The mae.py flags that pre-train the synthetic demo's teacher (default_teacher) before the
    student, or None when its folder holds a finished run, which is reused as it is; an
    interrupted one continues (--resume auto). The distillation flags are checked first against
    both shapes, so that a wrong block number does not wait for a teacher."""
    folder = os.path.dirname(args.teacher)
    student = build_mae(args.model, img_size=args.img_size, patch_size=args.patch_size,
                        recon_layer=args.recon_layer)
    teacher_shape = build_model(DEMO_TEACHER_MODEL, img_size=args.img_size,
                                patch_size=args.patch_size)
    student_layers, teacher_layers = distill_layers(args)
    distill.validate_layout(student, teacher_shape, student_layers, teacher_layers,
                            args.distill_target, args.teacher_input)
    if os.path.isfile(args.teacher):
        try:
            ckpt = torch.load(args.teacher, map_location="cpu", weights_only=True, mmap=True)
            stored = ckpt["args"]
            finished = ckpt["epoch"] + 1 >= stored["epochs"]
        except Exception:
            raise distill.DistillError(f"the demo teacher {args.teacher} cannot be read: delete "
                                       f"{folder} and run again (a new one is trained)") from None
        sizes = (stored.get("img_size"), stored.get("patch_size"))
        if sizes != (args.img_size, args.patch_size):
            raise distill.DistillError(
                f"the demo teacher in {folder} saw {sizes[0]}-px images in {sizes[1]}-px patches, "
                f"this run {args.img_size}-px images in {args.patch_size}-px patches: move "
                f"{folder} away (a new teacher is then trained there) or give --teacher")
        if finished:
            plumbing.print0(f"demo teacher: {args.teacher} ({stored['epochs']} epochs), reused")
            return None
    argv = demo_teacher_argv(args, demo_defaults)
    plumbing.print0(f"pre-training the demo teacher first: python mae.py {shlex.join(argv)}")
    return argv + ["--resume", "auto"]  # a teacher cut off before or after its first save
