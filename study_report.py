"""study_report.py: the statistics, the teacher gate, the claims' verdicts and the results
(results.json, results.md, figures) of study.py.

A difference is decided only when |mean| > 2 SE of the paired per-subset differences, and a
claim about pre-training only when the models it compares beat logistic regression on raw
pixels with the same labels.
"""
import json
import math
import os
import platform
import shutil
import statistics
import subprocess

import torch

from viewers import draw_curves  # the PIL line plot, shared with analyze.py curves


NAMES = {"scratch": "scratch", "mae": "MAE-Tiny", "dmae": "D-MAE-Tiny", "d2mae": "D2-MAE-Tiny",
         "tinymim": "TinyMIM-Tiny", "moco": "MoCo-v3-Tiny", "teacher": "MAE teacher",
         "random": "random ViT-Tiny", "pixels": "raw pixels"}
LOGIT_RMS_RANGE = (0.1, 30.0)  # a trained ViT's logits are a few units; at 30 softmax is one-hot


def subset_seeds(p):
    return list(range(p["few_subsets"]))



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
    ran = sorted({r["code_version"] for r in results.values()})  # a resumed study: several
    code = f"Code {version}" if ran == [version] else \
        f"Stages run by code {', '.join(ran)}, this report by {version}"
    lines = [f"# Fashion-MNIST study v2, preset `{preset}`", "",
             f"{code}, {hardware()}, {total / 60:.1f} min of stage time in all. "
             f"Test: {p['test_images'] or 10000} test images; held-out split: {p['heldout']} "
             "training images no stage trains on.", ""]
    for regime, rows in table.items():
        lines += [f"Top-1 with {regime_name(p, regime)} (mean ± SE over {len(rows[0][1])} "
                  "subsets/seeds, then each):", "", "| model | top-1 | per subset |",
                  "| --- | --- | --- |"]
        for name, values in rows:
            m, se = mean_se(values)
            each = ", ".join(f"{v:.1f}" for v in values)
            lines.append(f"| {name} | {m:.2f} ± {se:.2f} | {each} |")
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
