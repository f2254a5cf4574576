"""study.py: the papers' study in miniature, on real images, in one command (study v2).

    python study.py --preset smoke   # every stage on a handful of images (the CI test)
    python study.py --preset cpu     # the 2-core study, about 2 hours, teacher included
    python study.py --preset gpu     # one H100/H200, one command of at most ~9 minutes

Fashion-MNIST (apt-get install dataset-fashion-mnist, or its four .gz files in --data-root) at
28 px with 4-px patches (a 7 x 7 token grid). The study first writes two folders of IDX files
under <out>/data: `dev` (the training images less a held-out split, and the test images) and
`val` (the same training images, and the held-out split as its evaluation images). Every
stage calls one of the scripts' main(argv), so each is a command a user can run alone (it is
printed and recorded), and writes into <out>/<stage>/:
  1. calibration: logistic regression and kNN on raw pixels, and a randomly initialised
     ViT-Tiny's features, on the same labelled subsets as the fine-tuning runs;
  2. pre-training without labels: MAE-Tiny, MoCo-v3-Tiny (the same lr and epochs), and the
     teacher (a larger MAE, at least 4x the students' steps);
  3. the teacher gate: the teacher must reconstruct better than MAE-Tiny, score a higher kNN
     accuracy on the held-out split, and have attention logits of a sane size; only then are
     the students distilled (D-MAE, D^2-MAE, TinyMIM's relations when the preset has them);
  4. per-layer probes: the frozen kNN and linear accuracy of every layer, on the held-out split;
  5. validation runs that fix the fine-tuning lr (held-out split only), then fine-tuning of
     every model, scratch included, on the same label subsets: many subsets with few labels,
     two seeds with many; evaluated once on the test images after the last epoch;
  6. CKA against the supervised ViT-Tiny and the teacher, attention distance and entropy.
Then <out>/results.json and results.md (paired statistics, the regime check against the pixel
baseline, the verdicts) and figures. No setting is chosen by looking at test accuracy.

A stage whose stage.json exists is skipped when it ran with the command it has now and reads
nothing redone in this call (--fresh redoes everything); any other is deleted and redone, so
the study continues where it stopped. --mirror DIR copies each finished stage's record there.
"""
import argparse
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time

import numpy as np
import torch

import analyze
import data
import finetune
import mae
import moco
from viewers import draw_curves  # the PIL line plot, shared with analyze.py curves

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
    "smoke": dict(precision="fp32", workers=0, heldout=200, pretrain_images=256, teacher="vit_small",
                  teacher_epochs=2, epochs=1, batch=64, lr=1.5e-3, relation=True,
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
NAMES = {"scratch": "scratch", "mae": "MAE-Tiny", "dmae": "D-MAE-Tiny", "d2mae": "D2-MAE-Tiny",
         "tinymim": "TinyMIM-Tiny", "moco": "MoCo-v3-Tiny", "teacher": "MAE teacher",
         "random": "random ViT-Tiny", "pixels": "raw pixels"}
LOGIT_RMS_RANGE = (0.1, 30.0)  # a trained ViT's logits are a few units; at 30 softmax is one-hot


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


def subset_seeds(p):
    return list(range(p["few_subsets"]))


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
            command = f"python {script}.py " + " ".join(argv)
            inputs = sorted(n for n in self.redone if os.path.join(self.root, n, "") in command)
            tag = f"[{self.count}] {name}"
            if os.path.isfile(marker) and not self.fresh:
                done = read_json(marker)
                if done["command"] == command and not inputs:
                    self.results[name] = done
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


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------
# Statistics, the gate and the claims


def paired(a, b):
    """Mean and standard error of the per-pair differences a_i - b_i, and the differences."""
    diffs = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("inf")
    return statistics.mean(diffs), se, diffs


def mean_se(values):
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), se


def decide(diff, se):
    """reproduced / not reproduced when |mean| > 2 SE, else inconclusive."""
    if abs(diff) <= 2 * se:
        return "inconclusive"
    return "reproduced" if diff > 0 else "not reproduced"


def top1s(results, model, regime, seeds):
    return [results[f"{regime}_{model}_s{s}"]["numbers"]["top1"] for s in seeds]


def calibration(results, regime):
    """{row: [top-1 per subset]} of the pixel and random-ViT probes (the last layer)."""
    rows = {}
    for tag in ("pixels", "random"):
        probe = results[f"calib_{tag}_{regime}"]["numbers"]
        for kind in ("linear", "knn"):
            rows[f"{NAMES[tag]}, {'logistic regression' if kind == 'linear' else 'kNN'}"] = \
                [probe[kind][s][-1] for s in sorted(probe[kind], key=int)]
    return rows


def teacher_gate(results, p):
    """Is the teacher stronger than its student? Its pre-training loss below MAE-Tiny's, its
    held-out kNN accuracy (last layer) above MAE-Tiny's, its last block's attention logits of a
    sane size. Returns the record of the three checks and `passed`."""
    t, m = results["pretrain_teacher"]["numbers"], results["pretrain_mae"]["numbers"]
    tk, mk = (statistics.mean(r[-1] for r in results[f"layers_{x}"]["numbers"]["knn"].values())
              for x in ("teacher", "mae"))
    rms = results["layers_teacher"]["numbers"].get("attn_logit_rms")
    checks = {"loss": {"teacher": t["final_loss"], "mae": m["final_loss"],
                       "passed": t["final_loss"] < m["final_loss"]},
              "knn": {"teacher": tk, "mae": mk, "passed": tk > mk},
              "logit_rms": {"teacher": rms, "range": LOGIT_RMS_RANGE,
                            "passed": rms is not None and
                            LOGIT_RMS_RANGE[0] <= rms <= LOGIT_RMS_RANGE[1]}}
    checks["passed"] = all(c["passed"] for c in checks.values())
    return checks


def regime_claim(claim, results, p, pairs, pixels):
    """A claim decided by paired fine-tuning differences in both regimes. pairs: [(regime,
    model a, model b, sign)], a claim holds when sign * (a - b) > 0 in each. A claim gets a
    verdict only when both models beat the pixel logistic regression with the same labels."""
    evidence, verdicts, below = [], [], []
    for regime, a, b, sign in pairs:
        seeds = subset_seeds(p) if regime == "few" else list(p["many_seeds"])
        acc_a, acc_b = top1s(results, a, regime, seeds), top1s(results, b, regime, seeds)
        diff, se, _ = paired(acc_a, acc_b)
        base = statistics.mean(pixels[regime])
        for m, acc in ((a, acc_a), (b, acc_b)):
            if statistics.mean(acc) <= base and m not in below:
                below.append(m)
        evidence.append(f"{regime_name(p, regime)}: {NAMES[a]} − {NAMES[b]} {diff:+.2f} ± "
                        f"{se:.2f} (n = {len(seeds)}; {NAMES[a]} {statistics.mean(acc_a):.2f}, "
                        f"{NAMES[b]} {statistics.mean(acc_b):.2f}, pixels {base:.2f})")
        verdicts.append(decide(sign * diff, se))
    if below:
        verdict = "below the pixel baseline: the budget is too small to test this"
    elif all(v == "reproduced" for v in verdicts):
        verdict = "reproduced"
    elif "not reproduced" in verdicts:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive"
    return dict(claim=claim, verdict=verdict, evidence="; ".join(evidence))


def regime_name(p, regime):
    per_class = p[f"{regime}_per_class"]
    return f"{per_class} labels a class"


def check_claims(results, p, gate, models):
    pixels = {r: calibration(results, r)["raw pixels, logistic regression"]
              for r in ("few", "many")}
    claims = [regime_claim("MAE pre-training beats training from scratch (ViT-Tiny, fine-tuned)",
                           results, p, [("few", "mae", "scratch", 1),
                                        ("many", "mae", "scratch", 1)], pixels),
              regime_claim("MoCo-v3-Tiny beats MAE-Tiny when labels are scarce; MAE-Tiny wins "
                           "when they are plentiful", results, p,
                           [("few", "moco", "mae", 1), ("many", "moco", "mae", -1)], pixels)]
    distill = [regime_claim("Distillation (D-MAE) improves MAE-Tiny downstream", results, p,
                            [("few", "dmae", "mae", 1), ("many", "dmae", "mae", 1)], pixels),
               regime_claim("D²-MAE is better than D-MAE", results, p,
                            [("few", "d2mae", "dmae", 1), ("many", "d2mae", "dmae", 1)], pixels)] \
        if gate["passed"] else [dict(claim=c, verdict="not tested: the teacher is not stronger "
                                     "than the student", evidence=gate_text(gate))
                                for c in ("Distillation (D-MAE) improves MAE-Tiny downstream",
                                          "D²-MAE is better than D-MAE")]
    claims += distill + [higher_layers_claim(results, p, gate), *analysis_claims(results, models)]
    return claims


def higher_layers_claim(results, p, gate):
    """000/003: MAE-Tiny's higher layers learn little (kNN by layer stops rising) and
    distillation raises them: paired over the probe subsets, mean kNN of the last 4 layers."""
    claim = "Distillation raises the held-out kNN accuracy of MAE-Tiny's higher layers"
    if not gate["passed"]:
        return dict(claim=claim, verdict="not tested: the teacher is not stronger than the "
                    "student", evidence=gate_text(gate))
    def upper(m):
        knn = results[f"layers_{m}"]["numbers"]["knn"]
        return [statistics.mean(knn[s][-4:]) for s in sorted(knn, key=int)]
    evidence, verdicts = [], []
    for s in ("dmae", "d2mae"):
        diff, se, _ = paired(upper(s), upper("mae"))
        verdicts.append(decide(diff, se))
        evidence.append(f"{NAMES[s]} − MAE-Tiny, layers 9-12: {diff:+.2f} ± {se:.2f}")
    verdict = "reproduced" if all(v == "reproduced" for v in verdicts) else \
        "not reproduced" if "not reproduced" in verdicts else "inconclusive"
    return dict(claim=claim, verdict=verdict, evidence="; ".join(evidence))


def analysis_claims(results, models):
    """CKA and attention claims (no paired statistic: one model each; fixed margins)."""
    def diag(name):
        m = results[name]["numbers"]["matrix"]
        return [m[i][i] for i in range(min(len(m), len(m[0])))]

    def per_layer(entry, key):
        return [statistics.mean(heads) for heads in entry[key]]

    mae_sup = diag("cka_mae_vs_supervised")
    lower, upper = statistics.mean(mae_sup[1:5]), statistics.mean(mae_sup[-4:])
    claims = [dict(claim="MAE-Tiny's lower layers are closer to the supervised reference than its "
                         "higher layers (CKA)",
                   verdict="reproduced" if lower - upper > 0.1 else
                   "not reproduced" if upper - lower > 0.1 else "inconclusive",
                   evidence=f"diagonal CKA to the supervised ViT-Tiny: layers 1-4 {lower:.3f}, "
                            f"last 4 {upper:.3f} (needs a 0.1 gap)")]
    attn = results["attention"]["numbers"]
    mae_a, rand = attn[NAMES["mae"]], attn["random vit_tiny"]
    d_dist = statistics.mean(per_layer(rand, "distance_px")[-4:]) - \
        statistics.mean(per_layer(mae_a, "distance_px")[-4:])
    d_ent = statistics.mean(per_layer(rand, "entropy_nats")[-4:]) - \
        statistics.mean(per_layer(mae_a, "entropy_nats")[-4:])
    claims.append(dict(claim="MAE-Tiny's higher layers attend more locally and more sharply than "
                             "a random model's",
                       verdict="reproduced" if d_dist > 0 and d_ent > 0 else
                       "not reproduced" if d_dist < 0 and d_ent < 0 else "inconclusive",
                       evidence=f"random − MAE, blocks 9-12: distance {d_dist:+.2f} px, entropy "
                                f"{d_ent:+.3f} nats"))
    high = {k: statistics.mean(per_layer(attn[NAMES["moco"]], k)[-4:])
            - statistics.mean(per_layer(mae_a, k)[-4:]) for k in ("distance_px", "entropy_nats")}
    claims.append(dict(claim="MoCo-v3-Tiny's higher layers attend more globally and broadly than "
                             "MAE-Tiny's",
                       verdict="reproduced" if min(high.values()) > 0 else
                       "not reproduced" if max(high.values()) < 0 else "inconclusive",
                       evidence=f"MoCo − MAE, blocks 9-12: distance {high['distance_px']:+.2f} px"
                                f", entropy {high['entropy_nats']:+.3f} nats"))
    return claims


def gate_text(gate):
    return (f"teacher loss {gate['loss']['teacher']:.4f} vs MAE-Tiny {gate['loss']['mae']:.4f}; "
            f"held-out kNN {gate['knn']['teacher']:.2f} vs {gate['knn']['mae']:.2f}; last-block "
            f"logit RMS {gate['logit_rms']['teacher']:.2f} (sane: {LOGIT_RMS_RANGE[0]}-"
            f"{LOGIT_RMS_RANGE[1]})")


# ----------------------------------------------------------------------------------------------
# Outputs


def accuracy_table(results, p, models):
    """{regime: [(row name, [top-1 per subset/seed])]}: calibration rows first."""
    table = {}
    for regime, seeds in (("few", subset_seeds(p)), ("many", list(p["many_seeds"]))):
        rows = list(calibration(results, regime).items())
        rows += [(f"{NAMES[m]}, fine-tuned", top1s(results, m, regime, seeds))
                 for m in ["scratch"] + models]
        table[regime] = rows
    return table


def write_outputs(results, p, preset, root, version, gate, models, blrs):
    claims = check_claims(results, p, gate, models)
    table = accuracy_table(results, p, models)
    figures = os.path.join(root, "figures")
    os.makedirs(figures, exist_ok=True)
    draw_curves({NAMES[m]: [(r["step"], r["loss"]) for r in
                            read_jsonl(os.path.join(root, f"pretrain_{m}", "log.jsonl"))
                            if "loss" in r] for m in ["teacher"] + models if m != "moco"},
                "pre-training loss by step", os.path.join(figures, "pretrain.png"))
    layer_models = [m for m in ["teacher"] + models if f"layers_{m}" in results]
    draw_curves({NAMES[m]: list(enumerate(
        [statistics.mean(col) for col in zip(*results[f"layers_{m}"]["numbers"]["knn"].values())]))
        for m in layer_models}, "held-out kNN top-1 by layer", os.path.join(figures,
                                                                            "layers_knn.png"),
        xlabel="layer")
    for name in results:
        if name.startswith("cka_"):
            shutil.copy(os.path.join(root, name, "cka.png"), os.path.join(figures, f"{name}.png"))
    for png in ("attn_distance.png", "attn_entropy.png"):
        shutil.copy(os.path.join(root, "attention", png), os.path.join(figures, png))
    total = sum(r["seconds"] for r in results.values())
    summary = {"preset": preset, "settings": p, "code_version": version, "hardware": hardware(),
               "total_seconds": total, "finetune_blr": blrs, "teacher_gate": gate,
               "accuracy": {r: dict(rows) for r, rows in table.items()}, "claims": claims,
               "validation": {n: r["numbers"]["top1"] for n, r in results.items()
                              if n.startswith("val_")}, "stages": results}
    write_json(os.path.join(root, "results.json"), summary)
    lines = [f"# Fashion-MNIST study v2, preset `{preset}`", "",
             f"Code {version}, {hardware()}, {total / 60:.1f} min of stage time in all. "
             f"Test: {p['test_images'] or 10000} test images; held-out split: {p['heldout']} "
             "training images no stage trains on.", ""]
    for regime, rows in table.items():
        lines += [f"Top-1 with {regime_name(p, regime)} (mean ± SE over {len(rows[0][1])} "
                  "subsets/seeds, then each):", "", "| model | top-1 | per subset |",
                  "| --- | --- | --- |"]
        for name, values in rows:
            m, se = mean_se(values)
            lines.append(f"| {name} | {m:.2f} ± {se:.2f} | {', '.join(f'{v:.1f}' for v in values)} |")
        lines.append("")
    lines += [f"Fine-tuning lr chosen on the held-out split: scratch blr {blrs['scratch']:g}, "
              f"pre-trained blr {blrs['pretrained']:g} (candidates "
              f"{', '.join(f'{b:g}' for b in p['val_blrs'])}).", "",
              f"Teacher gate ({p['teacher']}): **{'passed' if gate['passed'] else 'failed'}** — "
              f"{gate_text(gate)}.", "", "Held-out kNN top-1 by layer (mean over "
              f"{p['probe_subsets']} subsets of {p['probe_per_class']} labels a class):", ""]
    for m in layer_models:
        knn = [statistics.mean(c) for c in zip(*results[f"layers_{m}"]["numbers"]["knn"].values())]
        lines.append(f"- {NAMES[m]}: {', '.join(f'{v:.1f}' for v in knn)}")
    lines += ["", "## Claims", "", "A difference is decided when |mean| > 2 SE of the paired "
              "per-subset differences; a claim about pre-training gets a verdict only when the "
              "models it compares beat the pixel logistic regression with the same labels.", ""]
    for i, c in enumerate(claims, start=1):
        lines.append(f"{i}. **{c['claim']}**: {c['verdict']}. {c['evidence']}.")
    lines += ["", "## Stages", "", "| stage | seconds | command |", "| --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['seconds']:.0f} | `{r['command']}` |")
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return claims


def code_version():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here)
        return rev.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") or "unknown"
    except OSError:
        return "unknown"


def hardware():
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return f"{gpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------
# Command line


def get_parser():
    p = argparse.ArgumentParser(description="The papers' study in miniature on Fashion-MNIST.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS),
                   help="smoke: CI-sized; cpu: the 2-core study (~2 h); gpu: one H100 (~9 min)")
    p.add_argument("--data-root", default=None,
                   help="folder of Fashion-MNIST's IDX files (none: the Debian package's, "
                        f"{data.FASHION_MNIST_DIR})")
    p.add_argument("--out-dir", default="out/study", help="where the stages and results go")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("--mirror", default=None, metavar="DIR",
                   help="also copy each finished stage's record, and the results, to DIR (a "
                        "cut-off run still leaves what it did there; e.g. a GPU job's $OUT)")
    p.add_argument("--until", default=None, choices=["pretrain", "probes", "finetune"],
                   help="stop after this phase (the rest continues on the next call)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    p = PRESETS[args.preset]
    source = args.data_root or data.FASHION_MNIST_DIR
    try:
        data.FashionMNIST(source, "train"), data.FashionMNIST(source, "val")
    except data.DataError:
        sys.exit(f"error: Fashion-MNIST not found in {source}: run `apt-get install -y "
                 "dataset-fashion-mnist` or pass --data-root to a folder of its four .gz files")
    for folder, flag in ((args.out_dir, "--out-dir"), (args.mirror, "--mirror")):
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
