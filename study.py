"""study.py: the papers' study in miniature, on real images, in one command.

    python study.py --preset smoke       # tiny, under 2 minutes on 2 CPU cores (the CI test)
    python study.py --preset cpu         # the reduced study, about 2 hours on 2 CPU cores
    python study.py --preset gpu         # one H100, ~18 minutes: all 60k images, ViT-B teacher

Fashion-MNIST (apt-get install dataset-fashion-mnist) at 28 px with 4-px patches (a 7 x 7 token
grid). Every stage calls one of the scripts' main(argv), so each is a command a user can run
alone (printed in the log), and writes into out/study/<stage>/:
  1. pre-training without labels: an MAE teacher (ViT-Small), then ViT-Tiny students with the
     same data, epochs, batch and seed: MAE, D-MAE (--distill-layer 12), D^2-MAE (--distill-layer
     12 --recon-layer 8), and TinyMIM's relations when the preset allows; and the papers'
     contrastive baseline, MoCo-v3 (moco.py), on the same images for the same epochs;
  2. references: a ViT-Tiny trained from scratch on the labels (also the CKA reference) and a
     randomly initialised one;
  3. downstream on the test images: fine-tuning with many labels (data-sufficient) and with 60
     per class over several fixed subsets (data-insufficient), linear probing, and the reserved
     blocks study (MAE-Tiny and MoCo-v3-Tiny with only their first k blocks kept);
  4. analyses: layer-wise CKA against the supervised reference and the teacher, attention
     distance and entropy.
Then out/study/results.json (every number with its command, seed, code version, hardware and
wall time), results.md (tables and the verdict on each claim of the papers) and PNGs.

No setting is chosen by looking at test accuracy: each preset is fixed before it runs, and the
fine-tuning runs are evaluated once, after their last epoch (--eval-every 0).
A stage whose stage.json exists is skipped when it ran with the command it has now and reads
nothing redone in this call (--fresh redoes everything); any other (interrupted, or made stale
by a changed preset) is deleted and redone, so the study continues where it stopped.
"""
import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch

import analyze
import data
import finetune
import mae
import moco
from viewers import draw_curves  # the PIL line plot, shared with analyze.py curves

# Each preset is fixed before it runs. Throughputs (images/s) only feed the expected times.
# Pre-training and linear probing use the papers' absolute lr (MAE: blr 1.5e-4 at batch 4096;
# FAIR's probe: LARS blr 0.1 at batch 16384, lr 6.4): with their blr at batch 256, LARS moved
# the probe's head by ~1e-4 of its norm per step and the first cpu run's probes did not train.
PROBE_LR = 6.4
PRESETS = {
    # The CI test: every stage and output, on a handful of images; numbers mean nothing.
    "smoke": dict(precision="fp32", teacher="vit_small", pretrain_images=64, pretrain_epochs=1,
                  batch=32, pretrain_lr=2.4e-3, relation=True, sufficient_per_class=6,
                  sufficient_epochs=1, scarce_per_class=4, scarce_epochs=1, scarce_batch=8,
                  seeds=(0, 1), reserved=(0, 8), reserved_seeds=(0,), probe_epochs=1,
                  test_images=64, analysis_images=32, workers=2, rate=40),
    # The 2-core CPU study: ~310 pre-training steps of batch 256 on 20k images; fine-tuning on
    # 500 labels a class (data-sufficient) and 60 a class (3 subsets); 5k test images.
    "cpu": dict(precision="bf16", teacher="vit_small", pretrain_images=20000, pretrain_epochs=4,
                batch=256, pretrain_lr=2.4e-3, relation=False, sufficient_per_class=500,
                sufficient_epochs=3, scarce_per_class=60, scarce_epochs=10, scarce_batch=64,
                seeds=(0, 1, 2), reserved=(0, 4, 8), reserved_seeds=(0,), probe_epochs=3,
                test_images=5000, analysis_images=1000, workers=2, rate=150),
    # One H100 in two 10-minute commands (~18 min; a session has 30 minutes of GPU time):
    # all 60k images, ViT-B teacher, TinyMIM too. The first run, at 10 pre-training epochs, did
    # 6 pre-training stages in 9 min (6-10k images/s, eager bf16: the step is host-bound).
    # The teacher's lr: 2.4e-3 x 192 / 768 (ViT-Tiny's width over ViT-B's). At 2.4e-3 the first
    # run's ViT-B teacher sat on MAE's 0.6 loss plateau for 10 epochs (0.56 at the end against
    # MAE-Tiny's 0.31) with attention logits in the hundreds; on a CPU proxy (240 steps, batch 64)
    # 6e-4 ended lower (0.632 vs 0.648) with 3x smaller logits. Chosen from training losses only.
    "gpu": dict(precision="bf16", teacher="vit_base", pretrain_images=None, pretrain_epochs=5,
                batch=256, pretrain_lr=2.4e-3, teacher_lr=6e-4, relation=True,
                sufficient_per_class=6000, sufficient_epochs=3, scarce_per_class=60,
                scarce_epochs=30, scarce_batch=64, seeds=(0, 1, 2), reserved=(0, 4, 8),
                reserved_seeds=(0,), probe_epochs=3, test_images=None, analysis_images=1000,
                workers=8, rate=8000),
}
IMAGE = ["--data", "fashion_mnist", "--img-size", "28", "--patch-size", "4"]
STUDENTS = ("mae", "dmae", "d2mae")  # (+ "tinymim" when the preset has relation=True)
RESERVED = ("mae", "moco")  # the models of the reserved-blocks study (000 Fig. 2-3)
NAMES = {"scratch": "scratch", "mae": "MAE-Tiny", "dmae": "D-MAE-Tiny", "d2mae": "D2-MAE-Tiny",
         "tinymim": "TinyMIM-Tiny", "moco": "MoCo-v3-Tiny", "teacher": "MAE teacher",
         "random": "random init"}


class StudyError(RuntimeError):
    """A study that cannot run (the message names the fix)."""


# ----------------------------------------------------------------------------------------------
# The stages: (name, script, argv, images processed for the expected time)


def stage_list(p, root, data_root):
    """Every stage of a preset, in order, as (name, script name, argv, images it processes)."""
    # compile off: at 28 px a stage runs for seconds, and each would compile anew (~20 s)
    common = IMAGE + (["--data-root", data_root] if data_root else []) + \
        ["--precision", p["precision"], "--num-workers", str(p["workers"]), "--compile", "off"]
    n_pre = p["pretrain_images"] or 60000

    def pretrain(lr):  # lr None: the script's own rule (MoCo-v3's)
        lr_flag = [] if lr is None else ["--lr", str(lr)]
        subset = ["--max-images", str(p["pretrain_images"])] if p["pretrain_images"] else []
        return common + ["--epochs", str(p["pretrain_epochs"]), "--warmup-epochs", "1",
                         "--batch-size", str(p["batch"])] + lr_flag + \
            ["--log-every", "5", "--save-every", "1000"] + subset

    pre = pretrain(p["pretrain_lr"])
    ckpt = lambda stage: os.path.join(root, stage, "checkpoint.pth")  # noqa: E731
    teacher = ["--teacher", ckpt("pretrain_teacher"), "--teacher-model", p["teacher"]]
    students = list(STUDENTS) + (["tinymim"] if p["relation"] else [])
    stages = [("pretrain_teacher", "mae",
               pretrain(p.get("teacher_lr", p["pretrain_lr"])) + ["--model", p["teacher"]],
               2 * n_pre)]
    flags = {"mae": [], "dmae": teacher + ["--distill-layer", "12"],
             "d2mae": teacher + ["--distill-layer", "12", "--recon-layer", "8"],
             "tinymim": teacher + ["--distill-target", "relation", "--teacher-input", "full",
                                   "--mask-ratio", "0", "--no-recon", "--student-drop-path", "0.1"]}
    for s in students:
        stages.append((f"pretrain_{s}", "mae", pre + ["--model", "vit_tiny"] + flags[s], n_pre))
    # the contrastive baseline: MoCo-v3's own lr (blr 1.5e-4 x batch / 256), same data and epochs
    stages.append(("pretrain_moco", "moco", pretrain(None) + ["--model", "vit_tiny"], 8 * n_pre))
    tuned = students + ["moco"]
    test = ["--max-images", str(p["test_images"])] if p["test_images"] else []
    tune = common + test + ["--eval-every", "0", "--log-every", "5"]
    sufficient = tune + ["--labels-per-class", str(p["sufficient_per_class"]), "--epochs",
                         str(p["sufficient_epochs"]), "--warmup-epochs", "1", "--batch-size",
                         str(p["batch"])]
    n_suff = 10 * p["sufficient_per_class"] * p["sufficient_epochs"]

    def scarce(seed):
        return tune + ["--labels-per-class", str(p["scarce_per_class"]), "--subset-seed",
                       str(seed), "--seed", str(seed), "--epochs", str(p["scarce_epochs"]),
                       "--warmup-epochs", "1", "--batch-size", str(p["scarce_batch"])]

    n_scarce = 10 * p["scarce_per_class"] * p["scarce_epochs"]
    n_test = p["test_images"] or 10000
    for init in ["scratch"] + tuned:
        start = [] if init == "scratch" else ["--init", ckpt(f"pretrain_{init}")]
        stages.append((f"sufficient_{init}", "finetune", start + sufficient, 2 * n_suff + n_test))
        for seed in p["seeds"]:
            stages.append((f"scarce_{init}_s{seed}", "finetune", start + scarce(seed),
                           2 * n_scarce + n_test))
    for init in tuned:
        stages.append((f"probe_{init}", "finetune",
                       ["--init", ckpt(f"pretrain_{init}"), "--recipe", "linprobe", "--lr",
                        str(PROBE_LR)] + tune +
                       ["--labels-per-class", str(p["sufficient_per_class"]), "--epochs",
                        str(p["probe_epochs"]), "--warmup-epochs", "1", "--batch-size",
                        str(p["batch"])], 10 * p["sufficient_per_class"] * p["probe_epochs"]
                       + n_test))
    for init in RESERVED:
        for k in p["reserved"]:
            keep = ["--init", ckpt(f"pretrain_{init}"), "--keep-blocks", str(k)]
            stages.append((reserved_stage(init, k, "sufficient"), "finetune", keep + sufficient,
                           2 * n_suff + n_test))
            for seed in p["reserved_seeds"]:
                stages.append((reserved_stage(init, k, f"scarce_s{seed}"), "finetune",
                               keep + scarce(seed), 2 * n_scarce + n_test))
    analysis = IMAGE + (["--data-root", data_root] if data_root else []) + \
        ["--num-images", str(p["analysis_images"]), "--batch-size", "64"]
    supervised = ckpt("sufficient_scratch")
    for s in tuned:
        for ref, ref_model in cka_references(s, p):
            b = supervised if ref == "supervised" else ckpt("pretrain_teacher")
            stages.append((f"cka_{s}_vs_{ref}", "analyze",
                           ["cka", "--a", ckpt(f"pretrain_{s}"), "--b", b, "--model-a",
                            "vit_tiny", "--model-b", ref_model, "--names", NAMES[s],
                            f"{ref} ({ref_model})"] + analysis, 2 * p["analysis_images"]))
    labels = [NAMES[s] for s in STUDENTS + ("moco",)] + ["supervised"]
    stages.append(("attention", "analyze",
                   ["attn", "--ckpt"] + [ckpt(f"pretrain_{s}") for s in STUDENTS + ("moco",)]
                   + [supervised]
                   + ["--labels"] + labels + ["--random-init", "vit_tiny"] + analysis,
                   5 * p["analysis_images"]))
    return [(name, script, argv + ["--out-dir", os.path.join(root, name)], images)
            for name, script, argv, images in stages]


def reserved_stage(init, k, regime):
    """The stage of a reserved-blocks run: 'reserved4_sufficient' for MAE-Tiny (the names of
    the first studies, so their finished stages are kept), 'reserved4_moco_scarce_s0' for
    MoCo-v3-Tiny."""
    return f"reserved{k}_{'' if init == 'mae' else init + '_'}{regime}"


def reserved_accuracies(results, p, acc, init):
    """{k: top-1} data-sufficient and with 60 labels a class (mean over the reserved seeds) of
    `init` with blocks 1..k kept, k = 12 being the whole model's fine-tuning."""
    suff = {k: results[reserved_stage(init, k, "sufficient")]["numbers"]["top1"]
            for k in p["reserved"]}
    scarce = {k: statistics.mean(results[reserved_stage(init, k, f"scarce_s{s}")]["numbers"]
                                 ["top1"] for s in p["reserved_seeds"]) for k in p["reserved"]}
    suff[12], scarce[12] = acc[init]["sufficient"], acc[init]["scarce"][0]
    return suff, scarce


def cka_references(model, p):
    """The references a pre-trained model is compared with by CKA: the supervised ViT-Tiny,
    and the MAE teacher for the MAE students (MoCo-v3 has none)."""
    refs = [("supervised", "vit_tiny")]
    return refs if model == "moco" else refs + [("teacher", p["teacher"])]


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
    numbers = {}
    if script == "finetune":
        numbers = {k: result[0][1][k] for k in ("top1", "top5", "val_loss", "images")}
    elif script in ("mae", "moco"):
        log = read_jsonl(os.path.join(out_dir, "log.jsonl"))
        numbers = {"final_loss": log[-1]["loss"], "steps": log[-1]["step"]}
    elif name == "attention":
        numbers = read_json(os.path.join(out_dir, "attn.json"))
    else:
        cka = read_json(os.path.join(out_dir, "cka.json"))
        numbers = {"matrix": cka["matrix"], "layers": cka["layers_a"]}
    return seconds, numbers


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------
# Claims


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(diff, noise):
    """reproduced (diff > noise), not reproduced (diff < -noise), or inconclusive."""
    return "reproduced" if diff > noise else "not reproduced" if diff < -noise else "inconclusive"


def accuracies(results, p, students):
    """{init: {"sufficient": top1, "scarce": (mean, std, [per seed])}} of scratch, the MAE
    students and MoCo-v3."""
    acc = {}
    for init in ["scratch"] + students + ["moco"]:
        per_seed = [results[f"scarce_{init}_s{s}"]["numbers"]["top1"] for s in p["seeds"]]
        acc[init] = {"sufficient": results[f"sufficient_{init}"]["numbers"]["top1"],
                     "scarce": (*mean_std(per_seed), per_seed)}
    return acc


def check_claims(results, p, students):
    """The eight claims of 000 and 003, each with its verdict and the numbers that decide it.
    The noise level is the spread of the data-insufficient runs over subsets and seeds: twice
    the largest std of the four models (at least 0.5 points) for accuracy differences."""
    acc = accuracies(results, p, students)
    noise = max(0.5, 2 * max(acc[i]["scarce"][1] for i in ["scratch"] + list(STUDENTS)))
    claims = []
    # 1. MAE beats scratch when fine-tuned
    d_suff = acc["mae"]["sufficient"] - acc["scratch"]["sufficient"]
    d_scarce = acc["mae"]["scarce"][0] - acc["scratch"]["scarce"][0]
    v = [verdict(d_suff, noise), verdict(d_scarce, noise)]
    claims.append(dict(claim="MAE pre-training beats training from scratch (ViT-Tiny, fine-tuned)",
                       verdict=v[0] if v[0] == v[1] else "inconclusive",
                       evidence=f"top-1 MAE − scratch: {d_suff:+.2f} (data-sufficient), "
                                f"{d_scarce:+.2f} (60 labels a class, mean of "
                                f"{len(p['seeds'])}); noise ±{noise:.2f}"))
    # 2. reserved blocks
    ks = sorted(p["reserved"])
    suff, scarce = reserved_accuracies(results, p, acc, "mae")
    k_low = min([k for k in ks if k > 0] or [12])  # the fewest kept blocks besides none
    gain_suff, gain_scarce = suff[12] - suff[0], scarce[12] - scarce[0]
    frac_suff = (suff[k_low] - suff[0]) / gain_suff if gain_suff else float("nan")
    frac_scarce = (scarce[k_low] - scarce[0]) / gain_scarce if gain_scarce else float("nan")
    if min(gain_suff, gain_scarce) <= noise:
        v2 = "inconclusive"
    else:
        v2 = "reproduced" if frac_suff >= 0.5 and frac_scarce < frac_suff else "not reproduced"
    claims.append(dict(
        claim="Lower layers carry most of the gain with many labels; higher layers matter more "
              "as labels get scarce (reserved blocks)",
        verdict=v2,
        evidence=f"top-1 keeping blocks 1..k, k = {', '.join(map(str, sorted(suff)))}: "
                 f"data-sufficient {', '.join(f'{suff[k]:.1f}' for k in sorted(suff))}; "
                 f"60 labels a class {', '.join(f'{scarce[k]:.1f}' for k in sorted(scarce))}; "
                 f"share of the gain (k=0 → 12) already with k={k_low}: {frac_suff:.2f} vs "
                 f"{frac_scarce:.2f}; needs both gains > noise ±{noise:.2f}"))
    # 3. CKA
    def diag(name):
        m = results[name]["numbers"]["matrix"]
        return [m[i][i] for i in range(min(len(m), len(m[0])))]

    mae_sup = diag("cka_mae_vs_supervised")
    lower, upper = statistics.mean(mae_sup[1:5]), statistics.mean(mae_sup[-4:])
    distilled = {s: statistics.mean(diag(f"cka_{s}_vs_supervised")[-4:])
                 for s in students if s != "mae"}
    cka_noise = 0.02
    first = verdict(lower - upper, 0.1)
    second = all(verdict(c - upper, cka_noise) == "reproduced" for c in distilled.values())
    claims.append(dict(
        claim="MAE-Tiny's lower layers are close to the supervised reference, its higher layers "
              "are not; distillation raises the higher layers' CKA",
        verdict="reproduced" if first == "reproduced" and second else
        "not reproduced" if first == "not reproduced" or all(
            c < upper - cka_noise for c in distilled.values()) else "inconclusive",
        evidence=f"diagonal CKA to the supervised ViT-Tiny, MAE-Tiny: layers 1-4 {lower:.3f}, "
                 f"last 4 {upper:.3f} (needs a 0.1 gap); last 4 of "
                 + ", ".join(f"{NAMES[s]} {c:.3f}" for s, c in distilled.items())
                 + f" (needs > MAE by {cka_noise})"))
    # 4. attention: MAE vs random
    attn = results["attention"]["numbers"]
    rand = attn[f"random vit_tiny"]
    mae_a = attn[NAMES["mae"]]

    def per_layer(entry, key):
        return [statistics.mean(heads) for heads in entry[key]]

    d_dist = [r - m for r, m in zip(per_layer(rand, "distance_px"), per_layer(mae_a, "distance_px"))]
    d_ent = [r - m for r, m in zip(per_layer(rand, "entropy_nats"),
                                   per_layer(mae_a, "entropy_nats"))]
    high_dist, low_dist = statistics.mean(d_dist[-4:]), statistics.mean(d_dist[:4])
    high_ent, low_ent = statistics.mean(d_ent[-4:]), statistics.mean(d_ent[:4])
    ok = high_dist > 0 and high_ent > 0
    claims.append(dict(
        claim="MAE-Tiny's attention is more local and more concentrated than a random model's, "
              "most of all in the higher layers",
        verdict="reproduced" if ok and high_dist > low_dist and high_ent > low_ent else
        "not reproduced" if high_dist < 0 and high_ent < 0 else "inconclusive",
        evidence=f"random − MAE, blocks 9-12 vs 1-4: distance {high_dist:+.2f} vs {low_dist:+.2f}"
                 f" px, entropy {high_ent:+.3f} vs {low_ent:+.3f} nats"))
    # 5. distillation improves MAE, most with scarce labels; D²-MAE >= D-MAE
    gains = {s: (acc[s]["sufficient"] - acc["mae"]["sufficient"],
                 acc[s]["scarce"][0] - acc["mae"]["scarce"][0]) for s in ("dmae", "d2mae")}
    improves = all(verdict(g[1], noise) == "reproduced" for g in gains.values())
    worse = all(verdict(g[1], noise) == "not reproduced" for g in gains.values())
    most_scarce = all(g[1] > g[0] for g in gains.values())
    d2_vs_d = acc["d2mae"]["scarce"][0] - acc["dmae"]["scarce"][0]
    claims.append(dict(
        claim="Distillation improves MAE-Tiny downstream, most with scarce labels; D²-MAE is at "
              "least as good as D-MAE",
        verdict="reproduced" if improves and most_scarce and d2_vs_d > -noise else
        "not reproduced" if worse or d2_vs_d < -noise else "inconclusive",
        evidence="top-1 gain over MAE-Tiny (data-sufficient, 60 labels a class): "
                 + ", ".join(f"{NAMES[s]} {g[0]:+.2f}, {g[1]:+.2f}" for s, g in gains.items())
                 + f"; D²-MAE − D-MAE with 60 labels a class {d2_vs_d:+.2f}; noise ±{noise:.2f}"))
    claims += moco_claims(results, acc, noise, diag, per_layer)
    return acc, claims


def moco_claims(results, acc, noise, diag, per_layer):
    """The three claims the MoCo-v3 baseline enables (000 Tab. 1/4, Fig. 1, Fig. 4)."""
    claims = []
    # 6. MoCo-v3 wins with scarce labels, MAE with plentiful ones
    d_scarce = acc["moco"]["scarce"][0] - acc["mae"]["scarce"][0]
    d_suff = acc["mae"]["sufficient"] - acc["moco"]["sufficient"]
    v = [verdict(d_scarce, noise), verdict(d_suff, noise)]
    claims.append(dict(
        claim="MoCo-v3-Tiny beats MAE-Tiny when labels are scarce; MAE-Tiny wins when they are "
              "plentiful",
        verdict="reproduced" if v == ["reproduced"] * 2 else
        "not reproduced" if "not reproduced" in v else "inconclusive",
        evidence=f"top-1 MoCo − MAE with 60 labels a class {d_scarce:+.2f}; MAE − MoCo "
                 f"data-sufficient {d_suff:+.2f}; noise ±{noise:.2f}"))
    # 7. CKA: MoCo's higher layers closer to the supervised reference than MAE's
    moco_up = statistics.mean(diag("cka_moco_vs_supervised")[-4:])
    mae_up = statistics.mean(diag("cka_mae_vs_supervised")[-4:])
    claims.append(dict(
        claim="MoCo-v3-Tiny's higher layers are closer to the supervised reference than "
              "MAE-Tiny's (CKA)",
        verdict=verdict(moco_up - mae_up, 0.02),
        evidence=f"diagonal CKA to the supervised ViT-Tiny, mean of the last 4 layers: "
                 f"MoCo-v3 {moco_up:.3f}, MAE {mae_up:.3f} (needs a 0.02 gap)"))
    # 8. attention: MoCo's more global and broad in the higher layers
    attn = results["attention"]["numbers"]
    high = {key: statistics.mean(per_layer(attn[NAMES["moco"]], key)[-4:])
            - statistics.mean(per_layer(attn[NAMES["mae"]], key)[-4:])
            for key in ("distance_px", "entropy_nats")}
    claims.append(dict(
        claim="MoCo-v3-Tiny's attention is more global and broad than MAE-Tiny's in the higher "
              "layers",
        verdict="reproduced" if min(high.values()) > 0 else
        "not reproduced" if max(high.values()) < 0 else "inconclusive",
        evidence=f"MoCo − MAE, blocks 9-12: distance {high['distance_px']:+.2f} px, entropy "
                 f"{high['entropy_nats']:+.3f} nats"))
    return claims


# ----------------------------------------------------------------------------------------------
# Outputs


def write_outputs(results, p, preset, root, total_seconds, version):
    students = list(STUDENTS) + (["tinymim"] if p["relation"] else [])
    acc, claims = check_claims(results, p, students)
    figures = os.path.join(root, "figures")
    os.makedirs(figures, exist_ok=True)
    curves = {NAMES[s.removeprefix("pretrain_")]: [(r["step"], r["loss"]) for r in
                                                   read_jsonl(os.path.join(root, s, "log.jsonl"))]
              for s in ["pretrain_teacher"] + [f"pretrain_{s}" for s in students]}
    draw_curves(curves, "pre-training loss (total) by step", os.path.join(figures, "pretrain.png"))
    tune_curves = {NAMES[i]: [(r["step"], r["loss"]) for r in
                              read_jsonl(os.path.join(root, f"sufficient_{i}", "log.jsonl"))
                              if "loss" in r and "top1" not in r]
                   for i in ["scratch"] + students + ["moco"]}
    draw_curves(tune_curves, "fine-tuning loss, data-sufficient",
                os.path.join(figures, "finetune.png"))
    for name in results:
        if name.startswith("cka_"):
            shutil.copy(os.path.join(root, name, "cka.png"), os.path.join(figures, f"{name}.png"))
    for png in ("attn_distance.png", "attn_entropy.png"):
        shutil.copy(os.path.join(root, "attention", png), os.path.join(figures, png))

    teacher = teacher_check(root, students)
    summary = {"preset": preset, "settings": p, "code_version": version,
               "hardware": hardware(), "total_seconds": total_seconds, "stages": results,
               "accuracy": acc, "claims": claims, "teacher_check": teacher}
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# Fashion-MNIST study, preset `{preset}`", "",
             f"Code {summary['code_version']}, {summary['hardware']}, "
             f"{total_seconds / 60:.1f} min of stage time in all.", "",
             "| model | fine-tuned, data-sufficient | fine-tuned, 60 labels a class (mean ± std) "
             "| linear probe |", "| --- | --- | --- | --- |"]
    for init in ["scratch"] + students + ["moco"]:
        probe = results.get(f"probe_{init}", {}).get("numbers", {}).get("top1")
        m, s, per = acc[init]["scarce"]
        lines.append(f"| {NAMES[init]} | {acc[init]['sufficient']:.2f} | {m:.2f} ± {s:.2f} "
                     f"({', '.join(f'{x:.1f}' for x in per)}) | "
                     f"{'–' if probe is None else f'{probe:.2f}'} |")
    lines += ["", "Reserved blocks (blocks 1..k kept, the rest re-initialised; 60 labels a class: "
              f"mean over seeds {', '.join(map(str, p['reserved_seeds']))}, k = 12 over all):",
              "", "| k | " + " | ".join(f"{NAMES[i]}, data-sufficient | {NAMES[i]}, 60 labels a "
                                        "class" for i in RESERVED) + " |",
              "| --- |" + " --- | --- |" * len(RESERVED)]
    tables = [reserved_accuracies(results, p, acc, i) for i in RESERVED]
    for k in sorted(p["reserved"]) + [12]:
        lines.append(f"| {k} | " + " | ".join(f"{suff[k]:.2f} | {scarce[k]:.2f}"
                                              for suff, scarce in tables) + " |")
    lines += ["", "CKA (diagonal, mean of the last four layers):", ""]
    for s in students + ["moco"]:
        for ref, _ in cka_references(s, p):
            m = results[f"cka_{s}_vs_{ref}"]["numbers"]["matrix"]
            d = [m[i][i] for i in range(min(len(m), len(m[0])))]
            lines.append(f"- {NAMES[s]} vs {ref}: {statistics.mean(d[-4:]):.3f} "
                         f"(per layer: {', '.join(f'{x:.2f}' for x in d)})")
    losses = teacher["teacher_loss"], teacher["mae_loss"]
    weak = None not in losses and losses[0] >= losses[1]
    lines += ["", "The teacher, from training losses (mean of the last 5 logged steps): "
              f"{p['teacher']} {loss_text(losses[0])} against MAE-Tiny's {loss_text(losses[1])}"
              + (" — **the teacher reconstructs worse than its student: a weak teacher**"
                 if weak else "") + "; distillation loss / reconstruction loss at the end: "
              + (", ".join(f"{NAMES[s]} {r:,.1f}x" for s, r in
                           teacher["distill_over_recon"].items()) or "–") + "."]
    lines += ["", "## Claims", ""]
    for i, c in enumerate(claims, start=1):
        lines.append(f"{i}. **{c['claim']}**: {c['verdict']}. {c['evidence']}.")
    lines += ["", "## Stages", "", "| stage | seconds | command |", "| --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['seconds']:.0f} | `{r['command']}` |")
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return claims


def loss_text(loss):
    """A final loss for results.md: n/a when no logged step held one."""
    return "n/a" if loss is None else f"{loss:.4f}"


def teacher_check(root, students, last=5):
    """Is the teacher worth distilling from? From training losses only (the mean of the last
    `last` logged steps): the teacher's pre-training loss against MAE-Tiny's (a teacher that
    reconstructs worse than the student is a weak one), and each distilled student's
    distillation loss as a multiple of its reconstruction loss (how much of its gradient is
    distillation)."""
    def final(stage, key="loss"):
        rows = [r for r in read_jsonl(os.path.join(root, stage, "log.jsonl")) if key in r]
        return statistics.mean(r[key] for r in rows[-last:]) if rows else None

    check = {"teacher_loss": final("pretrain_teacher"), "mae_loss": final("pretrain_mae"),
             "distill_over_recon": {}}
    for s in students:
        if s != "mae":
            distill_loss, recon_loss = (final(f"pretrain_{s}", k) for k in ("distill_loss",
                                                                             "recon_loss"))
            if distill_loss is not None and recon_loss:  # TinyMIM has no reconstruction
                check["distill_over_recon"][s] = distill_loss / recon_loss
    return check


def code_version():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__)))
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
                   help="smoke: CI-sized; cpu: the 2-core study; gpu: all 60k images on one H100")
    p.add_argument("--data-root", default=None,
                   help="folder of Fashion-MNIST's IDX files (none: the Debian package's, "
                        f"{data.FASHION_MNIST_DIR})")
    p.add_argument("--out-dir", default="out/study", help="where the stages and results go")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    p = PRESETS[args.preset]
    try:
        data.build_raw_dataset("fashion_mnist", args.data_root, "val")
    except data.DataError:
        sys.exit(f"error: Fashion-MNIST not found in {args.data_root or data.FASHION_MNIST_DIR}:"
                 " run `apt-get install -y dataset-fashion-mnist` or pass --data-root")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        sys.exit(f"error: --out-dir {args.out_dir} is a file; choose a folder")
    os.makedirs(args.out_dir, exist_ok=True)
    stages = stage_list(p, args.out_dir, args.data_root)
    expected = {name: images / p["rate"] for name, _, _, images in stages}
    results, started = {}, time.time()
    version = code_version()  # of the code imported now: later commits do not change this run
    redone = set()  # stages run in this call: the stages that read their outputs are redone too
    try:
        for i, (name, script, argv, _) in enumerate(stages, start=1):
            folder = os.path.join(args.out_dir, name)
            marker = os.path.join(folder, "stage.json")
            command = f"python {script}.py " + " ".join(argv)
            inputs = sorted(n for n in redone if os.path.join(args.out_dir, n, "") in command)
            if os.path.isfile(marker) and not args.fresh:
                done = read_json(marker)
                if done["command"] == command and not inputs:
                    results[name] = done
                    print(f"[{i}/{len(stages)}] {name}: done before ({done['seconds']:.0f} s), "
                          "skipped", flush=True)
                    continue
                why = f"reads {', '.join(inputs)}, redone now" if inputs else \
                    "ran with another command than this preset's now"
                print(f"[{i}/{len(stages)}] {name}: done before but {why}: redoing it",
                      flush=True)
            shutil.rmtree(folder, ignore_errors=True)  # half-written, stale or --fresh: redo it
            redone.add(name)
            print(f"[{i}/{len(stages)}] {name}: {command}  (expected ~{expected[name]:.0f} s)",
                  flush=True)
            seconds, numbers = run_stage(name, script, argv, args.out_dir)
            results[name] = {"command": command, "seconds": seconds, "numbers": numbers,
                             "seed": seed_of(argv), "code_version": version,
                             "hardware": hardware()}
            with open(marker + ".tmp", "w") as f:
                json.dump(results[name], f)
            os.replace(marker + ".tmp", marker)
            print(f"[{i}/{len(stages)}] {name}: done in {seconds:.0f} s "
                  f"(study so far {(time.time() - started) / 60:.1f} min)", flush=True)
        total = sum(r["seconds"] for r in results.values())
        claims = write_outputs(results, p, args.preset, args.out_dir, total, version)
    except StudyError as e:
        sys.exit(f"error: {e}")
    for c in claims:
        print(f"{c['verdict']:>15}: {c['claim']}")
    print(f"wrote {args.out_dir}/results.json, results.md and figures/")
    return claims


def seed_of(argv):
    return int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0


if __name__ == "__main__":
    main()
