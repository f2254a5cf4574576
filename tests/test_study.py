"""study.py (v2): the smoke preset end to end on the shipped Fashion-MNIST slice (the outputs'
structure, not the numbers), resuming, a half-written stage, the gpu preset's orchestration at
a reduced size, the statistics and verdict rules on hand-made numbers, bad input; and the
finetune / analyze pieces it relies on."""
import json
import math
import os
import shlex

import pytest
import torch

import analyze
import data
import finetune
import mae
import moco
import probe
import study
import study_report


def test_smoke_study_outputs_resumes_and_redoes_a_half_written_stage(tmp_path, capsys,
                                                                     fmnist_slice):
    out = str(tmp_path / "study")
    argv = ["--preset", "smoke", "--data-root", fmnist_slice, "--out-dir", out]
    claims = study.main(argv)
    assert len(claims) == 8
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert {"preset", "settings", "code_version", "hardware", "total_seconds", "stages",
            "accuracy", "claims", "teacher_gate", "finetune_blr", "validation"} <= set(results)
    gate = results["teacher_gate"]
    assert set(gate) == {"loss", "knn", "logit_rms", "passed"}
    assert gate["passed"] == all(gate[k]["passed"] for k in ("loss", "knn", "logit_rms"))
    # calibration rows first, then every fine-tuned model, with 2 subsets / 2 seeds each
    for regime in ("few", "many"):
        rows = list(results["accuracy"][regime])
        assert rows[:4] == ["raw pixels, logistic regression", "raw pixels, kNN",
                            "random ViT-Tiny, logistic regression", "random ViT-Tiny, kNN"]
        assert rows[4] == "scratch, fine-tuned"
        assert all(len(v) == 2 for v in results["accuracy"][regime].values())
    # the validation runs fixed the lr, on the held-out split only
    assert set(results["validation"]) == {f"val_{k}_blr{b:g}" for k in ("scratch", "pretrained")
                                          for b in study.PRESETS["smoke"]["val_blrs"]}
    scripts = {"mae.py": mae, "moco.py": moco, "finetune.py": finetune, "analyze.py": analyze}
    for name, stage in results["stages"].items():
        assert stage["command"].startswith("python ") and stage["seconds"] >= 0, name
        # the recorded command is pasteable: a shell splits it into flags the script accepts
        words = shlex.split(stage["command"])
        scripts[words[1]].get_parser().parse_args(words[2:])
        if name == "layers_teacher":
            assert words[words.index("--name") + 1] == "MAE teacher"
        if name.startswith("val_") or name.startswith("layers_"):
            assert "data/val" in stage["command"] and "data/dev" not in stage["command"]
        if name.startswith(("few_", "many_", "calib_")):
            assert "data/dev" in stage["command"]
    # the held-out split: 200 training images, in neither dev's training images nor the test's
    dev_train = data.FashionMNIST(os.path.join(out, "data", "dev"), "train")
    held = data.FashionMNIST(os.path.join(out, "data", "val"), "val")
    assert len(dev_train) == 2000 - 200 and len(held) == 200
    assert data.FashionMNIST(os.path.join(out, "data", "val"), "train").images.tobytes() == \
        dev_train.images.tobytes()
    md = open(os.path.join(out, "results.md")).read()
    assert "## Claims" in md and "Teacher gate (vit_small)" in md
    assert md.index("raw pixels, logistic regression") < md.index("MAE-Tiny, fine-tuned")
    for png in ("pretrain.png", "layers_knn.png", "attn_distance.png", "attn_entropy.png",
                "cka_mae_vs_supervised.png"):
        assert os.path.getsize(os.path.join(out, "figures", png)) > 0, png
    # a second run skips every stage; one whose stage.json is missing is redone, and one that
    # ran with another command is redone with the stages that read it
    n_stages = len(results["stages"])
    os.remove(os.path.join(out, "attention", "stage.json"))
    marker = os.path.join(out, "many_scratch_s0", "stage.json")
    with open(marker) as f:
        stale = json.load(f)
    stale["command"] = stale["command"].replace("--epochs 1", "--epochs 2")
    with open(marker, "w") as f:
        json.dump(stale, f)
    # earlier versions recorded the argv joined unquoted: such a stage is still done
    marker = os.path.join(out, "layers_teacher", "stage.json")
    with open(marker) as f:
        old = json.load(f)
    old["command"] = " ".join(shlex.split(old["command"]))
    assert "--name MAE teacher " in old["command"]
    with open(marker, "w") as f:
        json.dump(old, f)
    capsys.readouterr()
    study.main(argv)
    log = capsys.readouterr().out
    readers = [n for n, r in results["stages"].items()
               if os.path.join(out, "many_scratch_s0", "") in r["command"]]
    # the CKA against it of MAE-Tiny, MoCo-v3 and (gate passed) the 3 students; the attention
    assert len(readers) == (6 if results["teacher_gate"]["passed"] else 3)
    assert log.count("skipped") == n_stages - 1 - len(readers)
    assert "many_scratch_s0: done before but ran with another command" in log
    assert "cka_moco_vs_supervised: done before but reads many_scratch_s0" in log


def test_gpu_preset_orchestration_at_a_reduced_size(tmp_path, monkeypatch, fmnist_slice):
    """The gpu preset's stages (ViT-B teacher, TinyMIM, reserved blocks, 8 workers) on CPU with
    the smoke preset's sizes; --mirror receives each stage's record as it finishes."""
    gpu = study.PRESETS["gpu"]
    small = dict(study.PRESETS["smoke"], teacher=gpu["teacher"], relation=gpu["relation"],
                 reserved=gpu["reserved"][:2], workers=0, pretrain_images=64, teacher_epochs=1)
    monkeypatch.setitem(study.PRESETS, "gpu", small)
    # a one-epoch teacher on 64 images fails the gate; passed here, so the students' stages run
    gate = study.teacher_gate
    monkeypatch.setattr(study, "teacher_gate", lambda results, p: {**gate(results, p),
                                                                   "passed": True})
    mirror = tmp_path / "OUT"
    study.main(["--preset", "gpu", "--data-root", fmnist_slice, "--out-dir",
                str(tmp_path / "study"), "--mirror", str(mirror), "--until", "pretrain"])
    records = set(os.listdir(mirror / "stages"))
    assert {"pretrain_teacher.json", "pretrain_mae.json", "pretrain_moco.json",
            "calib_pixels_few.json", "layers_teacher.json"} <= records
    teacher = json.load(open(mirror / "stages" / "pretrain_teacher.json"))
    assert "--model vit_base" in teacher["command"] and "--lr 0.000375" in teacher["command"]
    assert {"pretrain_tinymim.json", "pretrain_d2mae.json"} <= records  # the gate passed
    assert not any(n.startswith(("few_", "many_", "val_")) for n in records)  # --until pretrain
    assert not {"layers_d2mae.json", "layers_tinymim.json"} & records  # nor the students' probes


def test_paired_statistics_by_hand():
    diff, se, diffs = study_report.paired([80.0, 82.0, 84.0], [79.0, 80.0, 81.0])
    assert diffs == [1.0, 2.0, 3.0] and diff == 2.0
    assert se == pytest.approx(1.0 / math.sqrt(3))  # stdev of 1, 2, 3 is 1
    assert study_report.decide(2.0, 0.9) == "reproduced" and study_report.decide(-2.0, 0.9) == "not reproduced"
    assert study_report.decide(2.0, 1.0) == "inconclusive"  # |mean| must exceed 2 SE


def fake_results(p, acc, pixels):
    """Stage records with the given top-1 per model (every subset and seed alike, but for a
    +/-0.5 wobble so that SE > 0) and pixel logistic-regression accuracy per regime."""
    results = {}
    for regime, seeds in (("few", study_report.subset_seeds(p)), ("many", list(p["many_seeds"]))):
        for m, a in acc.items():
            for i, s in enumerate(seeds):
                results[f"{regime}_{m}_s{s}"] = {"numbers": {"top1": a[regime] + (i % 2) - 0.5}}
        for tag in ("pixels", "random"):
            per = {str(s): [pixels[regime]] for s in seeds}
            results[f"calib_{tag}_{regime}"] = {"numbers": {"knn": per, "linear": per}}
    return results


def test_regime_check_and_verdicts():
    p = study.PRESETS["cpu"]
    pairs = [("few", "mae", "scratch", 1), ("many", "mae", "scratch", 1)]
    results = fake_results(p, {"mae": {"few": 75, "many": 85}, "scratch": {"few": 70, "many": 80}},
                           {"few": 65, "many": 78})
    pixels = {r: study_report.calibration(results, r)["raw pixels, logistic regression"]
              for r in ("few", "many")}
    assert study_report.regime_claim("c", results, p, pairs, pixels)["verdict"] == "reproduced"
    # scratch below the pixel baseline with many labels: no verdict, the numbers still shown
    results = fake_results(p, {"mae": {"few": 75, "many": 85}, "scratch": {"few": 70, "many": 77}},
                           {"few": 65, "many": 78})
    claim = study_report.regime_claim("c", results, p, pairs, pixels)
    assert claim["verdict"].startswith("below the pixel baseline")
    assert "+8.00" in claim["evidence"] and "pixels 78.00" in claim["evidence"]


def test_a_failed_gate_leaves_the_distillation_claims_untested():
    p = study.PRESETS["cpu"]
    results = {"pretrain_teacher": {"numbers": {"final_loss": 0.6}},
               "pretrain_mae": {"numbers": {"final_loss": 0.5}},
               "layers_teacher": {"numbers": {"knn": {"0": [50.0, 60.0]}, "attn_logit_rms": 3.0}},
               "layers_mae": {"numbers": {"knn": {"0": [50.0, 70.0]}}}}
    gate = study_report.teacher_gate(results, p)
    assert not gate["passed"] and not gate["loss"]["passed"] and not gate["knn"]["passed"]
    assert gate["logit_rms"]["passed"]
    results["layers_teacher"]["numbers"]["attn_logit_rms"] = 900.0  # the old ViT-B's scale
    assert not study_report.teacher_gate(results, p)["logit_rms"]["passed"]
    claim = study_report.higher_layers_claim(results, p, gate)
    assert claim["verdict"] == "not tested: the teacher is not stronger than the student"
    assert "0.6000 vs MAE-Tiny 0.5000" in claim["evidence"]


def test_knn_accuracy_by_hand():
    """Two training points per class on the unit circle; the test point's 3 neighbours vote
    with exp(cos / T): worked out by hand."""
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[0.6, 0.8]])  # cos: 0.6, 0.96, 0.8, -0.6
    # k = 3: class 1 gets exp(0.96/T) + exp(0.8/T), class 0 exp(0.6/T): class 1 wins
    assert probe.knn_accuracy(train, labels, test, torch.tensor([1]), k=3) == 100.0
    # k = 1 with a far test point of class 0: its nearest neighbour is class 0
    assert probe.knn_accuracy(train, labels, torch.tensor([[-0.9, -0.1]]), torch.tensor([0]),
                              k=1) == 100.0
    # the weights matter: k = 3, T large (votes nearly equal) vs T small
    test = torch.tensor([[1.0, 0.05]])  # cos ~ 1.0, 0.83, 0.05, -1.0: top 3 = 0, 1, 1
    assert probe.knn_accuracy(train, labels, test, torch.tensor([1]), k=3, temperature=100) \
        == 100.0  # two votes of ~1 beat one
    assert probe.knn_accuracy(train, labels, test, torch.tensor([0]), k=3,
                              temperature=0.01) == 100.0  # exp(100) beats exp(83) + exp(5)


def test_probes_on_separable_features_score_near_100():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g) * 5
    y = torch.arange(10).repeat(20)
    x = centres[y] + torch.randn(200, 32, generator=g)
    yt = torch.arange(10).repeat(10)
    xt = centres[yt] + torch.randn(100, 32, generator=g)
    assert probe.knn_accuracy(x, y, xt, yt) >= 99.0
    assert probe.linear_accuracy(x, y, xt, yt) >= 99.0
    shuffled = y[torch.randperm(200, generator=g)]  # labels unrelated to the features
    assert probe.knn_accuracy(x, shuffled, xt, yt) < 40.0


def test_probe_command_on_real_images(tmp_path, fmnist_slice):
    analyze.main(["probe", "--pixels", "--data", "fashion_mnist", "--data-root",
                  fmnist_slice, "--img-size", "28", "--labels-per-class", "20",
                  "--subset-seeds", "0", "1", "--linear", "--max-images", "500",
                  "--out-dir", str(tmp_path)])
    saved = json.load(open(tmp_path / "probe.json"))
    assert set(saved["knn"]) == {"0", "1"} and saved["eval_images"] == 500
    assert all(60 < a[0] < 95 for a in saved["knn"].values())  # pixels: far above chance (10)
    assert all(60 < a[0] < 95 for a in saved["linear"].values())


def test_bad_input_is_one_line(tmp_path, capsys, fmnist_slice):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        study.main(["--preset", "smoke", "--data-root", fmnist_slice, "--out-dir", str(a_file)])
    with pytest.raises(SystemExit, match="cannot be created"):
        study.main(["--preset", "smoke", "--data-root", fmnist_slice, "--out-dir",
                    str(a_file / "sub")])
    with pytest.raises(SystemExit, match="apt-get install -y dataset-fashion-mnist"):
        study.main(["--preset", "smoke", "--data-root", str(tmp_path), "--out-dir",
                    str(tmp_path / "o")])
    for mirror in (tmp_path / "o", tmp_path / "o" / "pretrain_mae"):  # deleted by a redone stage
        with pytest.raises(SystemExit, match="overlap"):
            study.main(["--preset", "smoke", "--data-root", fmnist_slice, "--out-dir",
                        str(tmp_path / "o"), "--mirror", str(mirror)])
    assert not (tmp_path / "o").exists()  # nothing made before the check
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--preset", "huge"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_labels_per_class_subsets_are_balanced_fixed_and_differ_by_seed():
    ds = data.build_dataset("synthetic", synthetic_size=200, img_size=8)
    labels = data.labels_of(ds)
    a = data.per_class_subset(ds, 3, seed=0)
    counts = torch.bincount(torch.tensor([labels[i] for i in a.indices]), minlength=10)
    assert counts.tolist() == [3] * 10
    assert a.indices == data.per_class_subset(ds, 3, seed=0).indices
    assert a.indices != data.per_class_subset(ds, 3, seed=1).indices
    with pytest.raises(data.DataError, match="fewer than --labels-per-class"):
        data.per_class_subset(ds, 1000, seed=0)


def test_eval_every_zero_evaluates_once_after_the_last_epoch(tmp_path):
    finetune.main(["--img-size", "16", "--patch-size", "4", "--synthetic-size", "32",
                   "--max-images", "16", "--batch-size", "8", "--epochs", "3",
                   "--warmup-epochs", "1", "--num-workers", "0", "--eval-every", "0",
                   "--out-dir", str(tmp_path)])
    with open(tmp_path / "log.jsonl") as f:
        evals = [json.loads(line) for line in f if "top1" in line]
    assert [r["epoch"] for r in evals] == [3]


def test_eval_keeps_the_files_pooling_and_recipe(tmp_path):
    flags = ["--img-size", "16", "--patch-size", "4", "--synthetic-size", "16", "--max-images",
             "16", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0",
             "--num-workers", "0"]
    finetune.main(flags + ["--recipe", "transfer", "--lr", "0.01", "--global-pool", "token",
                           "--out-dir", str(tmp_path)])
    path = str(tmp_path / "checkpoint.pth")
    args = finetune.parse_args(["--init", path, "--eval"])
    assert (args.recipe, args.global_pool) == ("transfer", "token")  # not the recipe's avg
    result = finetune.main(["--init", path, "--eval", "--num-workers", "0",
                            "--synthetic-size", "16", "--max-images", "16"])
    assert set(result) >= {"top1", "top5"}  # one evaluation, not one per swept lr


def test_hiera_student_with_a_full_image_teacher_is_refused(capsys):
    import mae

    with pytest.raises(SystemExit) as exit_info:
        mae.main(["--model", "hiera_tiny_lite", "--teacher", "t.pth", "--teacher-model",
                  "hiera_tiny_lite", "--teacher-input", "full"])
    assert exit_info.value.code == 2 and "--teacher-input visible" in capsys.readouterr().err
