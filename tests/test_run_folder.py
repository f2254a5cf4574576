"""A run folder never loses work: a new run into a folder holding an earlier run's checkpoints
stops with one line (and the earlier files are untouched) unless --resume or --overwrite; an
out-dir that cannot be created gets one line from every script."""
import hashlib
import json
import os

import pytest
import torch

import analyze
import finetune
import mae
import moco
import plumbing
import probe
import study

MAE = ["--img-size", "16", "--patch-size", "4", "--synthetic-size", "16", "--batch-size", "8",
       "--num-workers", "0", "--epochs", "1", "--warmup-epochs", "0", "--compile", "off"]
MOCO = MAE + ["--mlp-dim", "32", "--out-dim", "16"]
FINETUNE = MAE


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("script,flags", [(mae, MAE), (moco, MOCO), (finetune, FINETUNE)],
                         ids=["mae", "moco", "finetune"])
def test_a_finished_run_is_not_replaced(tmp_path, capsys, script, flags):
    out = str(tmp_path / "run")
    script.main(flags + ["--out-dir", out])
    before = {f: digest(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".pth")}
    assert "checkpoint.pth" in before
    with pytest.raises(SystemExit) as exit_info:
        script.main(flags + ["--out-dir", out, "--seed", "1"])  # the same command, another seed
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert "holds an earlier run's checkpoints" in err and "checkpoint.pth" in err
    assert "--resume auto" in err and "--overwrite" in err and "another --out-dir" in err
    assert {f: digest(os.path.join(out, f)) for f in before} == before  # nothing replaced
    script.main(flags + ["--out-dir", out, "--seed", "1", "--overwrite"])  # told to: it may
    assert digest(os.path.join(out, "checkpoint.pth")) != before["checkpoint.pth"]


def test_resume_auto_continues_instead(tmp_path):
    out = str(tmp_path / "run")
    mae.main(MAE + ["--out-dir", out])
    mae.main(MAE + ["--out-dir", out, "--epochs", "2", "--resume", "auto"])
    assert os.path.isfile(os.path.join(out, "checkpoint-2.pth"))


def test_an_out_dir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = str(blocker / "sub")  # a folder under a file: makedirs fails (NotADirectoryError)
    for script, flags in ((mae, MAE), (moco, MOCO), (finetune, FINETUNE)):
        with pytest.raises(SystemExit) as exit_info:
            script.main(flags + ["--out-dir", bad])
        assert exit_info.value.code == 2
        assert "cannot be created" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analyze.main(["attn", "--random-init", "vit_tiny", "--out-dir", bad])
    assert "cannot be created" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot be created"):
        study.main(["--preset", "smoke", "--out-dir", bad, "--data-root",
                    os.path.join(os.path.dirname(__file__), "data", "fashion-mnist-slice")])


def test_an_out_dir_where_nothing_can_be_written_is_one_line(tmp_path, capsys):
    """os.access says yes to root everywhere: /proc refuses new folders even to root, and an
    empty --out-dir would otherwise mean the current folder."""
    for out, said in (("/proc/nanomim_cannot_be_here", "cannot be created or written"),
                      ("", "--out-dir is empty")):
        with pytest.raises(SystemExit) as exit_info:
            mae.main(MAE + ["--out-dir", out])
        assert exit_info.value.code == 2 and said in capsys.readouterr().err
    mae.parse_args(MAE + ["--out-dir", str(tmp_path / "a" / "b")])  # the check leaves nothing
    assert os.listdir(tmp_path) == []


def test_overwrite_deletes_the_whole_earlier_run(tmp_path):
    out = tmp_path / "run"
    mae.main(MAE + ["--epochs", "2", "--save-every", "1", "--log-every", "1",
                    "--out-dir", str(out)])
    assert {"checkpoint-1.pth", "checkpoint-2.pth"} <= set(os.listdir(out))
    mae.main(MAE + ["--log-every", "1", "--out-dir", str(out), "--overwrite"])
    assert not (out / "checkpoint-2.pth").exists()  # no epoch of the old run is left beside
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == sorted(steps) and max(steps) == 2  # 1 epoch of 2 steps, nothing appended


def test_overwrite_keeps_the_runs_init_and_other_runs_below(tmp_path):
    """--overwrite deletes the earlier run's own files only: not the --init file it is about to
    read, not a run in a sub-folder, not a file of the user's."""
    out = tmp_path / "run"
    mae.main(MAE + ["--epochs", "2", "--save-every", "1", "--out-dir", str(out)])
    (out / "other").mkdir()
    torch.save({"x": 1}, out / "other" / "checkpoint.pth")
    (out / "notes.txt").write_text("mine")
    mae.main(MAE + ["--out-dir", str(out), "--overwrite", "--init", str(out / "checkpoint-2.pth")])
    assert (out / "other" / "checkpoint.pth").exists() and (out / "notes.txt").exists()
    assert (out / "checkpoint-2.pth").exists() and (out / "checkpoint-1.pth").exists()  # new


def test_a_sweep_over_an_earlier_run(tmp_path, capsys):
    out = tmp_path / "ft"
    sweep = FINETUNE + ["--recipe", "transfer", "--lr", "0.01,0.1", "--out-dir", str(out)]
    (out / "lr0.1").mkdir(parents=True)
    (out / "lr0.1" / "log.jsonl").write_text("{}\n")  # one lr's run stopped before its save
    with pytest.raises(SystemExit):
        finetune.main(sweep)
    assert os.path.join("lr0.1", "log.jsonl") in capsys.readouterr().err
    finetune.main(FINETUNE + ["--out-dir", str(out), "--overwrite"])  # a single run, then
    finetune.main(sweep + ["--overwrite"])  # a sweep over it: the single run's files go
    assert not (out / "checkpoint.pth").exists() and not (out / "log.jsonl").exists()
    assert (out / "lr0.01" / "best.pth").exists() and (out / "lr0.1" / "best.pth").exists()


def test_under_torchrun_only_rank_0_probes_the_out_dir(tmp_path, monkeypatch):
    parser = mae.get_parser()
    monkeypatch.setenv("RANK", "1")
    plumbing.check_out_dir(parser, str(tmp_path / "new"))  # no probe, nothing made
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("RANK", "0")
    plumbing.check_out_dir(parser, str(tmp_path / "q" / ".." / "new"))  # normalised
    assert os.listdir(tmp_path) == []


def test_a_log_without_checkpoints_is_an_earlier_run_too(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"step": 99, "loss": 1.0}) + "\n")
    with pytest.raises(SystemExit):
        mae.main(MAE + ["--out-dir", str(out)])
    err = capsys.readouterr().err
    assert "log.jsonl but no checkpoint" in err and "--overwrite" in err
    assert "step\": 99" in (out / "log.jsonl").read_text()  # untouched
    mae.main(MAE + ["--log-every", "1", "--out-dir", str(out), "--resume", "auto"])  # relaunch
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")][0] == 1


def test_resuming_a_finished_run_trains_and_redraws_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    mae.main(MAE + ["--epochs", "2", "--save-every", "1", "--out-dir", str(out)])
    files = {f: digest(out / f) for f in os.listdir(out)}
    capsys.readouterr()
    mae.main(MAE + ["--out-dir", str(out), "--resume", "auto"])
    assert "nothing to train (raise --epochs" in capsys.readouterr().out
    mae.main(MAE + ["--out-dir", str(out), "--resume", str(out / "checkpoint-1.pth"),
                    "--epochs", "1"])
    assert {f: digest(out / f) for f in os.listdir(out)} == files
    # only numbered saves left (checkpoint.pth removed): the error names the latest of them
    os.remove(out / "checkpoint.pth")
    with pytest.raises(SystemExit):
        mae.main(MAE + ["--out-dir", str(out), "--resume", "auto"])
    assert f"continue it with --resume {out / 'checkpoint-2.pth'}," in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is a folder: give its checkpoint.pth"):
        mae.main(MAE + ["--out-dir", str(tmp_path / "other"), "--resume", str(out)])


def test_pretraining_on_a_flat_folder_of_images(tmp_path, capsys):
    """--data folder: images at any depth, no class folders; a corrupt file is skipped and
    counted, as with imagefolder; fine-tuning on it is refused (no labels)."""
    from PIL import Image

    import data

    root = tmp_path / "photos"
    (root / "2024" / "june").mkdir(parents=True)
    for i in range(14):
        where = root if i % 2 else root / "2024" / "june"
        Image.new("RGB", (20, 24), (i * 15, 100, 200 - i * 10)).save(where / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    (root / "2024" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ds = data.build_raw_dataset("folder", str(root), "train")
    assert len(ds) == 15 and all(label == 0 for _, label in ds.samples)
    out = tmp_path / "run"
    mae.main(["--data", "folder", "--data-root", str(root), "--img-size", "16", "--patch-size",
              "4", "--batch-size", "4", "--num-workers", "0", "--epochs", "1",
              "--warmup-epochs", "0", "--compile", "off", "--out-dir", str(out)])
    assert os.path.isfile(out / "checkpoint.pth")
    log = open(out / "log.jsonl").read()
    assert '"skipped_images": 1' in log or "broken.jpg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.main(["--data", "folder", "--data-root", str(root), "--out-dir",
                       str(tmp_path / "ft")])
    assert "has no labels" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match="no image files found"):
        data.build_raw_dataset("folder", str(empty), "train")


def test_knn_monitor_and_tensorboard_on_a_tiny_pretraining(tmp_path):
    """Every epoch's kNN top-1 in log.jsonl, the epoch line and TensorBoard (read back with
    tensorboard's own reader), with the end-of-run pictures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    mae.main(MAE + ["--epochs", "2", "--knn-every", "1", "--knn-images", "16", "--tensorboard",
                    "--log-every", "1",
                    "--out-dir", str(out)])
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    knn = [r for r in rows if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [1, 2] and all(0 <= r["knn_top1"] <= 100 for r in knn)
    events = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"loss", "lr", "images_per_s", "knn_top1"} <= set(tags["scalars"])
    assert [e.value for e in events.Scalars("knn_top1")] == pytest.approx(
        [r["knn_top1"] for r in knn])
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in rows if "loss" in r]
    assert {"curves", "reconstruction"} <= set(tags["images"])


def test_knn_monitor_is_off_without_labels_and_with_zero(tmp_path, capsys):
    args = mae.parse_args(["--data", "folder", "--data-root", str(tmp_path), "--knn-every", "1"])
    assert probe.knn_monitor(args) is None
    assert "kNN monitor off: --data folder has no labels" in capsys.readouterr().out
    assert args.knn_every == 0  # what the run did, in its checkpoint's args
    args = mae.parse_args(["--knn-every", "0"])
    assert probe.knn_monitor(args) is None and args.knn_every == 0
    args = mae.parse_args(["--data", "folder", "--data-root", str(tmp_path)])  # the default
    assert probe.knn_monitor(args) is None and "no labels" in capsys.readouterr().out


def test_knn_monitor_without_a_val_split_scores_training_images_it_does_not_fit(tmp_path, capsys):
    from test_data import write_image_folder

    write_image_folder(tmp_path / "imgs" / "train", per_class=12, corrupt=0)  # no val/ folder
    monitor = probe.KnnMonitor("imagefolder", str(tmp_path / "imgs"), 16, images=10)
    fitted, scored = set(monitor.train.indices), set(monitor.val.indices)
    assert len(fitted) == 10 and len(scored) == 5 and not fitted & scored
    assert monitor.train.dataset is monitor.val.dataset
    assert "no validation split" in capsys.readouterr().out


def test_knn_monitor_is_on_by_default_on_labelled_data():
    args = mae.parse_args(["--synthetic-size", "40", "--knn-images", "10"])
    assert isinstance(probe.knn_monitor(args), probe.KnnMonitor) and args.knn_every == 1


def test_knn_monitor_scores_a_separating_encoder_near_100():
    """An 'encoder' whose features are the image's mean colour per channel: on the synthetic
    shapes those do not name the class, on images coloured by class they do."""
    monitor = probe.KnnMonitor("synthetic", None, 16, images=40, synthetic_size=80)

    class ByLabel(torch.nn.Module):  # features: a one-hot of the label, looked up by image
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Identity()
            self.table = {}
            for ds in (monitor.train, monitor.val):
                for img, y in (ds[i] for i in range(len(ds))):
                    self.table[round(img.sum().item(), 1)] = y

        def forward_features(self, imgs):
            labels = torch.tensor([self.table[round(img.sum().item(), 1)] for img in imgs])
            return torch.nn.functional.one_hot(labels, 10).float(), None, None

        def forward_head(self, x):
            return x

    assert monitor(ByLabel(), torch.device("cpu")) == 100.0
    assert len({y for _, y in (monitor.train[i] for i in range(40))}) == 10  # all classes
