"""study.py: the papers' study in miniature, on real images, in one command (study v2).

    python study.py --preset smoke   # every stage on a handful of images (the CI test)
    python study.py --preset cpu     # the 2-core study, about 2.5 hours (measured), teacher too
    python study.py --preset gpu     # one H100/H200, one command of at most ~9 minutes

Fashion-MNIST at 28 px in 4-px patches. Data: <out>/data/dev (training images less a held-out
split; the test images) and <out>/data/val (the held-out split as evaluation images). Each
stage calls a script's main(argv), a command a user can run alone, and writes <out>/<stage>/:
calibration (pixels, random ViT), pre-training (MAE-Tiny, MoCo-v3, the teacher), the teacher
gate, distillation (D-MAE, D^2-MAE), per-layer probes, the lr fixed on the held-out split,
fine-tuning on the same label subsets, CKA and attention. study_report.py then writes
results.json / results.md and figures. docs/results.md gives the design; no setting is
chosen by looking at test accuracy.

A stage whose stage.json exists is skipped when it ran with the command it has now and reads
nothing redone in this call (--fresh redoes everything); any other is deleted and redone, so
the study continues where it stopped. --mirror DIR copies each finished stage's record there.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import struct
import sys
import time

import numpy as np
import torch

import analyze
import data
import finetune
import mae
import moco
from study_report import (NAMES, code_version, gate_text, hardware, read_json, read_jsonl,
                          subset_seeds, teacher_gate, write_json, write_outputs)

# The fine-tuning recipe for 28-px grayscale, fixed before any run (the papers' ImageNet recipe,
# RandAugment, mixup and cutmix, is made for 300 epochs at 224 px): light crops, label
# smoothing, drop path. Its lr is chosen per kind of start (scratch / pre-trained) on the
# held-out split, from the preset's candidates.
FT_RECIPE = ["--rand-aug", "0", "--mixup", "0", "--cutmix", "0", "--reprob", "0",
             "--smoothing", "0.1", "--drop-path", "0.1", "--min-crop-scale", "0.5",
             "--eval-every", "0"]
LAYER_DECAY = {"scratch": "1.0", "pretrained": "0.75"}
PRESETS = {
    # The CI test: every stage and output on a few hundred images; the numbers mean nothing.
    "smoke": dict(precision="fp32", workers=0, heldout=200, pretrain_images=256,
                  teacher="vit_small", teacher_epochs=2, epochs=1, batch=64, lr=1.5e-3,
                  relation=True,
                  few_per_class=4, few_subsets=2, few_epochs=1, few_batch=8,
                  many_per_class=8, many_seeds=(0, 1), many_epochs=1, many_batch=16,
                  val_blrs=(1e-3, 2e-3), test_images=100, probe_per_class=8, probe_subsets=2,
                  analysis_images=32, reserved=(0, 8), knn_images=32, rate=100),
    # The 2-core CPU study: all 55k training images, 2 epochs for the students (430 steps of
    # 256), 8 for the ViT-Small teacher; 10 labels a class over 8 subsets, 100 a class with 2
    # seeds; 5,000 test images. Reserved blocks left out: the per-layer probes answer the same
    # question for a fraction of the cost.
    "cpu": dict(precision="bf16", workers=2, heldout=5000, pretrain_images=None,
                teacher="vit_small", teacher_epochs=8, epochs=2, batch=256, lr=1.5e-3,
                relation=False, few_per_class=10, few_subsets=8, few_epochs=50, few_batch=32,
                many_per_class=100, many_seeds=(0, 1), many_epochs=20, many_batch=128,
                val_blrs=(5e-4, 1e-3, 2e-3), test_images=5000, probe_per_class=100,
                probe_subsets=4, analysis_images=1000, reserved=(), rate=250),
    # One H100/H200 in one command: a ViT-Base teacher, TinyMIM, reserved blocks. `rate` is
    # the images/s each preset's time estimates assume.
    "gpu": dict(precision="bf16", workers=8, heldout=5000, pretrain_images=None,
                teacher="vit_base", teacher_epochs=8, epochs=2, batch=256, lr=1.5e-3,
                relation=True, few_per_class=10, few_subsets=8, few_epochs=50, few_batch=32,
                many_per_class=500, many_seeds=(0, 1), many_epochs=10, many_batch=256,
                val_blrs=(5e-4, 1e-3, 2e-3), test_images=None, probe_per_class=100,
                probe_subsets=8, analysis_images=1000, reserved=(0, 4, 8), rate=6000),
}
IMAGE = ["--data", "fashion_mnist", "--img-size", "28", "--patch-size", "4"]
DISTILLED = ("dmae", "d2mae", "tinymim")


class StudyError(RuntimeError):
    """A study that cannot run (the message names the fix)."""


# ----------------------------------------------------------------------------------------------
# Data: the held-out split, written as two Fashion-MNIST folders


def write_idx(path, array):
    """An uncompressed IDX file of a uint8 array (Fashion-MNIST's own format)."""
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                        *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    os.replace(path + ".tmp", path)


def prepare_data(source, root, heldout, seed=0):
    """<root>/data/dev (training images less `heldout` of them drawn with `seed`; the test
    images) and <root>/data/val (the same training images; the held-out ones to evaluate on).
    Returns the two folders; kept when already written for this source and split."""
    dev, val = os.path.join(root, "data", "dev"), os.path.join(root, "data", "val")
    marker = os.path.join(root, "data", "split.json")
    want = {"source": os.path.abspath(source), "heldout": heldout, "seed": seed}
    if os.path.isfile(marker) and read_json(marker) == want:
        return dev, val
    train, test = (data.FashionMNIST(source, split) for split in ("train", "val"))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held = np.sort(order[:heldout].numpy())
    kept = np.sort(order[heldout:].numpy())
    for folder in (dev, val):
        os.makedirs(folder, exist_ok=True)
    for folder in (dev, val):
        write_idx(os.path.join(folder, "train-images-idx3-ubyte"), train.images[kept])
        write_idx(os.path.join(folder, "train-labels-idx1-ubyte"), train.labels[kept])
    write_idx(os.path.join(dev, "t10k-images-idx3-ubyte"), test.images)
    write_idx(os.path.join(dev, "t10k-labels-idx1-ubyte"), test.labels)
    write_idx(os.path.join(val, "t10k-images-idx3-ubyte"), train.images[held])
    write_idx(os.path.join(val, "t10k-labels-idx1-ubyte"), train.labels[held])
    with open(marker, "w") as f:
        json.dump(want, f)
    return dev, val


# ----------------------------------------------------------------------------------------------
# The stages: (name, script, argv, images processed for the expected time)


def pretraining_stages(p, root, dev):
    """The teacher, MAE-Tiny and MoCo-v3-Tiny: none needs another stage."""
    common = IMAGE + ["--data-root", dev, "--precision", p["precision"], "--num-workers",
                      str(p["workers"]), "--compile", "off", "--batch-size", str(p["batch"]),
                      "--warmup-epochs", "1", "--log-every", "5", "--save-every", "1000"] + \
        (["--max-images", str(p["pretrain_images"])] if p["pretrain_images"] else []) + \
        (["--knn-images", str(p["knn_images"])] if "knn_images" in p else [])
    n = p["pretrain_images"] or 60000 - p["heldout"]
    # The teacher's lr: the students' times their width over its width (192 / 384 for ViT-Small,
    # 192 / 768 for ViT-Base), so that wider models take smaller steps.
    teacher_lr = p["lr"] * 192 / {"vit_small": 384, "vit_base": 768}[p["teacher"]]
    stages = [("pretrain_mae", "mae", common + ["--model", "vit_tiny", "--epochs", str(p["epochs"]),
                                                "--lr", str(p["lr"])], n * p["epochs"]),
              ("pretrain_moco", "moco", common + ["--model", "vit_tiny", "--epochs",
                                                  str(p["epochs"]), "--lr", str(p["lr"])],
               6 * n * p["epochs"]),
              ("pretrain_teacher", "mae", common + ["--model", p["teacher"], "--epochs",
                                                    str(p["teacher_epochs"]), "--lr",
                                                    f"{teacher_lr:g}"],
               2 * n * p["teacher_epochs"])]
    return stages, common


def distilled_stages(p, root, common):
    teacher = ["--teacher", ckpt(root, "teacher"), "--teacher-model", p["teacher"]]
    flags = {"dmae": ["--distill-layer", "12"],
             "d2mae": ["--distill-layer", "12", "--recon-layer", "8"],
             "tinymim": ["--distill-target", "relation", "--teacher-input", "full", "--mask-ratio",
                         "0", "--no-recon", "--student-drop-path", "0.1"]}
    n = p["pretrain_images"] or 60000 - p["heldout"]
    return [(f"pretrain_{s}", "mae", common + ["--model", "vit_tiny", "--epochs", str(p["epochs"]),
                                               "--lr", str(p["lr"])] + teacher + flags[s],
             2 * n * p["epochs"]) for s in students(p)]


def students(p):
    return ["dmae", "d2mae"] + (["tinymim"] if p["relation"] else [])


def ckpt(root, model):
    return os.path.join(root, f"pretrain_{model}", "checkpoint.pth")


def probe_stage(p, name, what, folder, per_class, seeds, linear=True):
    test = ["--max-images", str(p["test_images"])] if p["test_images"] and "dev" in folder else []
    return (name, "analyze", ["probe", *what, *IMAGE, "--data-root", folder, "--labels-per-class",
                              str(per_class), "--subset-seeds", *map(str, seeds), "--batch-size",
                              "256"] + test + (["--linear"] if linear else []),
            10 * per_class * len(seeds) + 10000)


def calibration_stages(p, dev):
    """Pixels and a random ViT-Tiny on the test images, with each fine-tuning regime's labels."""
    stages = []
    for what, tag in ((["--pixels"], "pixels"), (["--random-init", "vit_tiny"], "random")):
        stages.append(probe_stage(p, f"calib_{tag}_few", what, dev, p["few_per_class"],
                                  subset_seeds(p)))
        stages.append(probe_stage(p, f"calib_{tag}_many", what, dev, p["many_per_class"],
                                  p["many_seeds"]))
    return stages


def layer_probe_stages(p, root, val, models):
    """Every layer of each pre-trained model, on the held-out split."""
    seeds = list(range(p["probe_subsets"]))
    return [probe_stage(p, f"layers_{m}", ["--ckpt", ckpt(root, m), "--model",
                                           p["teacher"] if m == "teacher" else "vit_tiny",
                                           "--name", NAMES[m]], val, p["probe_per_class"], seeds)
            for m in models]


def tune_argv(p, folder, init, regime, seed, blr, kind):
    """finetune.py's argv for one run: init None = scratch; regime few or many."""
    per_class, epochs, batch = (p["few_per_class"], p["few_epochs"], p["few_batch"]) \
        if regime == "few" else (p["many_per_class"], p["many_epochs"], p["many_batch"])
    test = ["--max-images", str(p["test_images"])] if p["test_images"] and "dev" in folder else []
    start = [] if init is None else ["--init", init]
    return start + IMAGE + ["--data-root", folder, "--precision", p["precision"],
                            "--num-workers", str(p["workers"]), "--compile", "off",
                            "--model", "vit_tiny", "--labels-per-class", str(per_class),
                            "--subset-seed", str(seed), "--seed", str(seed), "--epochs",
                            str(epochs), "--warmup-epochs", str(max(1, epochs // 10)),
                            "--batch-size", str(batch), "--blr", f"{blr:g}", "--layer-decay",
                            LAYER_DECAY[kind], "--log-every", "5"] + FT_RECIPE + test


def validation_stages(p, root, val):
    """The fine-tuning lr: each candidate, for scratch and for MAE-Tiny (the representative
    pre-trained start), few labels (subset 0), scored on the held-out split."""
    stages = []
    for kind, init in (("scratch", None), ("pretrained", ckpt(root, "mae"))):
        for blr in p["val_blrs"]:
            stages.append((f"val_{kind}_blr{blr:g}", "finetune",
                           tune_argv(p, val, init, "few", 0, blr, kind),
                           10 * p["few_per_class"] * p["few_epochs"] + p["heldout"]))
    return stages


def chosen_blr(results, p, kind):
    """The candidate lr with the best held-out top-1 (ties: the smaller lr)."""
    scores = [(results[f"val_{kind}_blr{b:g}"]["numbers"]["top1"], -b) for b in p["val_blrs"]]
    return -max(scores)[1]


def finetune_stages(p, root, dev, models, blrs):
    stages = []
    for m in ["scratch"] + models:
        kind = "scratch" if m == "scratch" else "pretrained"
        init = None if m == "scratch" else ckpt(root, m)
        for regime, seeds in (("few", subset_seeds(p)), ("many", p["many_seeds"])):
            per_class, epochs = (p["few_per_class"], p["few_epochs"]) if regime == "few" else \
                (p["many_per_class"], p["many_epochs"])
            for seed in seeds:
                stages.append((f"{regime}_{m}_s{seed}", "finetune",
                               tune_argv(p, dev, init, regime, seed, blrs[kind], kind),
                               20 * per_class * epochs + (p["test_images"] or 10000)))
    for k in p["reserved"]:  # 000 Fig. 2-3: blocks 1..k of MAE-Tiny kept, the rest re-drawn
        for regime in ("few", "many"):
            argv = tune_argv(p, dev, ckpt(root, "mae"), regime, 0, blrs["pretrained"],
                             "pretrained") + ["--keep-blocks", str(k)]
            stages.append((f"reserved{k}_{regime}_s0", "finetune", argv,
                           20 * p[f"{regime}_per_class"] * p[f"{regime}_epochs"] + 10000))
    return stages


def analysis_stages(p, root, dev, models):
    common = IMAGE + ["--data-root", dev, "--num-images", str(p["analysis_images"]),
                      "--batch-size", "64"]
    supervised = os.path.join(root, f"many_scratch_s{p['many_seeds'][0]}", "checkpoint.pth")
    stages = []
    for m in models:
        for ref, ref_model, b in (("supervised", "vit_tiny", supervised),
                                  ("teacher", p["teacher"], ckpt(root, "teacher"))):
            if ref == "teacher" and m not in ("mae",) + DISTILLED:
                continue
            stages.append((f"cka_{m}_vs_{ref}", "analyze",
                           ["cka", "--a", ckpt(root, m), "--b", b, "--model-a", "vit_tiny",
                            "--model-b", ref_model, "--names", NAMES[m], f"{ref} ({ref_model})"]
                           + common, 2 * p["analysis_images"]))
    stages.append(("attention", "analyze",
                   ["attn", "--ckpt"] + [ckpt(root, m) for m in models] + [supervised] +
                   ["--labels"] + [NAMES[m] for m in models] + ["supervised", "--random-init",
                                                                "vit_tiny"] + common,
                   5 * p["analysis_images"]))
    return stages


def with_out_dirs(stages, root):
    return [(name, script, argv + ["--out-dir", os.path.join(root, name)], images)
            for name, script, argv, images in stages]


# ----------------------------------------------------------------------------------------------
# Running stages


class Runner:
    """Runs stages in order, skipping those finished with the same command, and records them."""

    def __init__(self, root, rate, fresh, mirror, version):
        self.root, self.rate, self.fresh, self.mirror = root, rate, fresh, mirror
        self.version, self.results, self.redone = version, {}, set()
        self.started, self.count = time.time(), 0

    def run(self, stages):
        for name, script, argv, images in with_out_dirs(stages, self.root):
            self.count += 1
            folder = os.path.join(self.root, name)
            marker = os.path.join(folder, "stage.json")
            command = shlex.join(["python", f"{script}.py", *argv])  # pasteable in a shell
            # stage.json files of earlier versions hold the argv joined unquoted: still the same
            unquoted = f"python {script}.py " + " ".join(argv)
            inputs = sorted(n for n in self.redone if os.path.join(self.root, n, "") in command)
            tag = f"[{self.count}] {name}"
            if os.path.isfile(marker) and not self.fresh:
                done = read_json(marker)
                if done["command"] in (command, unquoted) and not inputs:
                    self.results[name] = {**done, "command": command}
                    print(f"{tag}: done before ({done['seconds']:.0f} s), skipped", flush=True)
                    continue
                why = f"reads {', '.join(inputs)}, redone now" if inputs else \
                    "ran with another command than this preset's now"
                print(f"{tag}: done before but {why}: redoing it", flush=True)
            shutil.rmtree(folder, ignore_errors=True)  # half-written, stale or --fresh
            self.redone.add(name)
            print(f"{tag}: {command}  (expected ~{images / self.rate:.0f} s)", flush=True)
            seconds, numbers = run_stage(name, script, argv, self.root)
            self.results[name] = {"command": command, "seconds": seconds, "numbers": numbers,
                                  "code_version": self.version, "hardware": hardware()}
            write_json(marker, self.results[name])
            if self.mirror:
                write_json(os.path.join(self.mirror, "stages", f"{name}.json"),
                           self.results[name])
            print(f"{tag}: done in {seconds:.0f} s (study so far "
                  f"{(time.time() - self.started) / 60:.1f} min)", flush=True)


def run_stage(name, script, argv, root):
    """Run one stage's script in this process; returns its wall time and the numbers it wrote."""
    out_dir = os.path.join(root, name)
    start = time.time()
    try:
        result = {"mae": mae.main, "moco": moco.main, "finetune": finetune.main,
                  "analyze": analyze.main}[script](argv)
    except SystemExit as e:  # the scripts' one-line errors
        raise StudyError(f"stage {name} stopped: {e.code}") from None
    seconds = time.time() - start
    if script == "finetune":
        numbers = {k: result[0][1][k] for k in ("top1", "top5", "val_loss", "images")}
    elif script in ("mae", "moco"):
        log = read_jsonl(os.path.join(out_dir, "log.jsonl"))
        numbers = {"final_loss": final(log, "loss"), "steps": log[-1]["step"]}
        for key in ("recon_loss", "distill_loss"):
            if final(log, key) is not None:
                numbers[key] = final(log, key)
    elif argv[0] == "probe":
        numbers = read_json(os.path.join(out_dir, "probe.json"))
    elif argv[0] == "attn":
        numbers = read_json(os.path.join(out_dir, "attn.json"))
    else:
        cka = read_json(os.path.join(out_dir, "cka.json"))
        numbers = {"matrix": cka["matrix"], "layers": cka["layers_a"]}
    return seconds, numbers


def final(log, key, last=5):
    """The mean of `key` over the last `last` logged steps that hold it (None if none does)."""
    rows = [r[key] for r in log if key in r]
    return statistics.mean(rows[-last:]) if rows else None


# ----------------------------------------------------------------------------------------------
# Statistics, the gate and the claims


# ----------------------------------------------------------------------------------------------
# Outputs


# ----------------------------------------------------------------------------------------------
# Command line


def get_parser():
    p = argparse.ArgumentParser(description="The papers' study in miniature on Fashion-MNIST.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS),
                   help="smoke: CI-sized; cpu: the 2-core study (~2.5 h); gpu: one H100 (~9 min)")
    p.add_argument("--data-root", default=None,
                   help="folder of Fashion-MNIST's IDX files (none: the Debian package's, "
                        f"{data.FASHION_MNIST_DIR})")
    p.add_argument("--out-dir", default="out/study", help="where the stages and results go")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("--mirror", default=None, metavar="DIR",
                   help="also copy each finished stage's record, and the results, to DIR (a "
                        "cut-off run still leaves what it did there; e.g. a GPU job's $OUT)")
    p.add_argument("--until", default=None, choices=["pretrain", "probes", "finetune"],
                   help="stop after this phase (the rest continues on the next call): pretrain "
                        "(every pre-training, with the probes the teacher gate reads), probes "
                        "(and the students' layer probes), finetune")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    p = PRESETS[args.preset]
    source = args.data_root or data.FASHION_MNIST_DIR
    try:
        data.FashionMNIST(source, "train"), data.FashionMNIST(source, "val")
    except data.DataError as e:  # missing or corrupt, each with its fix
        sys.exit(f"error: {e}")
    mirror, out = (os.path.realpath(f) + os.sep for f in (args.mirror or ".", args.out_dir))
    if args.mirror and mirror.startswith(out):  # the same folder, or one inside it
        sys.exit(f"error: --mirror {args.mirror} and --out-dir {args.out_dir} overlap (a stage "
                 "redone would delete records): give --mirror a folder outside --out-dir")
    for folder, flag in ((args.mirror, "--mirror"), (args.out_dir, "--out-dir")):
        if folder is None:
            continue
        if os.path.exists(folder) and not os.path.isdir(folder):
            sys.exit(f"error: {flag} {folder} is a file; choose a folder")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            sys.exit(f"error: {flag} {folder} cannot be created ({e.strerror}); choose a "
                     "writable folder")
    root = args.out_dir
    version = code_version()  # of the code imported now: later commits do not change this run
    runner = Runner(root, p["rate"], args.fresh, args.mirror, version)
    try:
        dev, val = prepare_data(source, root, p["heldout"])
        runner.run(calibration_stages(p, dev))
        pre, common = pretraining_stages(p, root, dev)
        runner.run(pre)
        runner.run(layer_probe_stages(p, root, val, ["teacher", "mae", "moco"]))
        gate = teacher_gate(runner.results, p)
        print(f"teacher gate: {'passed' if gate['passed'] else 'FAILED'} ({gate_text(gate)})",
              flush=True)
        models = ["mae", "moco"]
        if gate["passed"]:
            runner.run(distilled_stages(p, root, common))
            if args.until != "pretrain":  # (the gate above needed the first models' probes)
                runner.run(layer_probe_stages(p, root, val, students(p)))
            models = ["mae", *students(p), "moco"]
        else:
            print("the distilled students are not trained: the teacher is not stronger than "
                  "its student (see the gate above)", flush=True)
        if args.until in ("pretrain", "probes"):
            return None
        runner.run(validation_stages(p, root, val))
        blrs = {kind: chosen_blr(runner.results, p, kind) for kind in ("scratch", "pretrained")}
        runner.run(finetune_stages(p, root, dev, models, blrs))
        if args.until == "finetune":
            return None
        runner.run(analysis_stages(p, root, dev, models))
        claims = write_outputs(runner.results, p, args.preset, root, version, gate, models, blrs)
    except StudyError as e:
        sys.exit(f"error: {e}")
    if args.mirror:
        for name in ("results.json", "results.md"):
            shutil.copy(os.path.join(root, name), os.path.join(args.mirror, name))
    for c in claims:
        print(f"{c['verdict']}: {c['claim']}")
    print(f"wrote {root}/results.json, results.md and figures/")
    return claims


if __name__ == "__main__":
    main()
