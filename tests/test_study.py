"""study.py: the smoke preset end to end (the outputs' structure, not the numbers), resuming,
a half-written stage, bad input; and the finetune / mae flags it relies on."""
import json
import os

import pytest
import torch

import data
import finetune
import study

HAVE_DATA = os.path.isdir(data.FASHION_MNIST_DIR)
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="apt-get install dataset-fashion-mnist")


@needs_data
def test_smoke_study_outputs_resumes_and_redoes_a_half_written_stage(tmp_path, capsys):
    out = str(tmp_path / "study")
    claims = study.main(["--preset", "smoke", "--out-dir", out])
    assert len(claims) == 8
    assert {c["verdict"] for c in claims} <= {"reproduced", "not reproduced", "inconclusive"}
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert {"preset", "settings", "code_version", "hardware", "total_seconds", "stages",
            "accuracy", "claims", "teacher_check"} <= set(results)
    assert set(results["teacher_check"]["distill_over_recon"]) == {"dmae", "d2mae"}
    stages = study.stage_list(study.PRESETS["smoke"], out, None)
    assert set(results["stages"]) == {name for name, _, _, _ in stages}
    for name, stage in results["stages"].items():
        assert stage["command"].startswith("python ") and stage["seconds"] >= 0, name
    assert set(results["accuracy"]) == {"scratch", "mae", "dmae", "d2mae", "tinymim", "moco"}
    assert results["stages"]["pretrain_moco"]["numbers"]["steps"] == 2
    assert {"reserved8_sufficient", "reserved8_moco_sufficient", "reserved0_moco_scarce_s0"} \
        <= set(results["stages"])  # MAE-Tiny's and MoCo-v3-Tiny's reserved blocks
    assert results["stages"]["pretrain_mae"]["numbers"]["steps"] == 2  # --max-images 64, batch 32
    md = open(os.path.join(out, "results.md")).read()
    check = results["teacher_check"]
    weak = check["teacher_loss"] >= check["mae_loss"]
    assert "## Claims" in md and md.count("**") == 16 + 2 * weak
    assert "The teacher, from training losses" in md and ("a weak teacher" in md) == weak
    assert "| 8 | " in md and "MoCo-v3-Tiny, data-sufficient" in md
    for png in ("pretrain.png", "finetune.png", "attn_distance.png", "attn_entropy.png",
                "cka_mae_vs_supervised.png", "cka_d2mae_vs_teacher.png"):
        assert os.path.getsize(os.path.join(out, "figures", png)) > 0, png
    # a second run skips every stage; one whose stage.json is missing is redone, and one that
    # ran with another command (a changed preset) is redone with the stages that read it
    os.remove(os.path.join(out, "attention", "stage.json"))
    marker = os.path.join(out, "sufficient_scratch", "stage.json")
    with open(marker) as f:
        stale = json.load(f)
    stale["command"] = stale["command"].replace("--epochs 1", "--epochs 2")
    with open(marker, "w") as f:
        json.dump(stale, f)
    capsys.readouterr()
    study.main(["--preset", "smoke", "--out-dir", out])
    log = capsys.readouterr().out
    readers = [n for n, _, argv, _ in stages if os.path.join(out, "sufficient_scratch", "")
               in " ".join(argv)]
    assert len(readers) == 6  # the CKA of the 5 pre-trained models against it, the attention
    assert log.count("skipped") == len(stages) - 1 - len(readers)
    assert "attention: python analyze.py attn" in log
    assert "sufficient_scratch: done before but ran with another command" in log
    assert "cka_moco_vs_supervised: done before but reads sufficient_scratch" in log


def test_bad_input_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    if HAVE_DATA:
        with pytest.raises(SystemExit, match="is a file"):
            study.main(["--preset", "smoke", "--out-dir", str(a_file)])
    with pytest.raises(SystemExit, match="apt-get install -y dataset-fashion-mnist"):
        study.main(["--preset", "smoke", "--data-root", str(tmp_path), "--out-dir",
                    str(tmp_path / "o")])
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


def test_teacher_check_reads_the_last_logged_losses(tmp_path):
    """The final losses of the teacher and MAE-Tiny and the distillation / reconstruction ratio,
    from log.jsonl files written here (the numbers worked out by hand); no log rows: None."""
    def log(stage, rows):
        os.makedirs(tmp_path / stage)
        with open(tmp_path / stage / "log.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    log("pretrain_teacher", [{"step": s, "loss": v} for s, v in [(1, 9.0), (2, 0.6), (3, 0.5)]])
    log("pretrain_mae", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 0.3},
                         {"step": 2, "top1": 50.0}])  # a row without the key is ignored
    log("pretrain_dmae", [{"step": 1, "loss": 101.0, "recon_loss": 1.0, "distill_loss": 100.0},
                          {"step": 2, "loss": 30.5, "recon_loss": 0.5, "distill_loss": 30.0}])
    log("pretrain_tinymim", [{"step": 1, "loss": 3.0, "distill_loss": 3.0}])  # no recon
    check = study.teacher_check(str(tmp_path), ["mae", "dmae", "tinymim"], last=2)
    assert check["teacher_loss"] == pytest.approx(0.55)  # (0.6 + 0.5) / 2
    assert check["mae_loss"] == pytest.approx(1.15)  # the two rows holding a loss: 2.0, 0.3
    assert check["distill_over_recon"] == {"dmae": pytest.approx((100 + 30) / (1 + 0.5))}
    log("empty/pretrain_teacher", [])
    log("empty/pretrain_mae", [{"step": 1, "top1": 1.0}])
    empty = study.teacher_check(str(tmp_path / "empty"), ["mae"])
    assert empty == {"teacher_loss": None, "mae_loss": None, "distill_over_recon": {}}


def test_gpu_preset_teacher_has_its_own_lr_and_moco_its_rule():
    """The gpu preset's teacher trains at teacher_lr, the MAE students at pretrain_lr, MoCo-v3
    at its script's blr rule (no --lr); the cpu preset's teacher keeps pretrain_lr."""
    def lr_of(preset, stage):
        argv = {n: a for n, _, a, _ in study.stage_list(study.PRESETS[preset], "r", None)}[stage]
        return float(argv[argv.index("--lr") + 1]) if "--lr" in argv else None

    gpu = study.PRESETS["gpu"]
    assert lr_of("gpu", "pretrain_teacher") == gpu["teacher_lr"] != gpu["pretrain_lr"]
    assert lr_of("gpu", "pretrain_dmae") == lr_of("gpu", "pretrain_mae") == gpu["pretrain_lr"]
    assert lr_of("gpu", "pretrain_moco") is None
    assert lr_of("cpu", "pretrain_teacher") == study.PRESETS["cpu"]["pretrain_lr"]
