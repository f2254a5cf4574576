"""Same numbers: per-step losses of fixed-seed tiny CPU runs of every layout, recorded from the code
before the readers' redesign (tests/golden_losses.json) and asserted after it, and a checkpoint
written by that code (tests/data/pre_redesign_checkpoint.pth.gz, tensors replaced by constants so
it compresses) that must still load and resume.

    python tests/test_same_numbers.py --record     # rewrite the golden file (only on purpose)
"""
import gzip
import json
import os
import shutil
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import finetune  # noqa: E402
import mae  # noqa: E402
import plumbing  # noqa: E402
from checkpoints import load_pretrained  # noqa: E402
from model import ViT  # noqa: E402
from presets import build_model  # noqa: E402

GOLDEN = os.path.join(HERE, "golden_losses.json")
OLD_CHECKPOINT = os.path.join(HERE, "data", "pre_redesign_checkpoint.pth.gz")
VIT = ["--img-size", "16", "--patch-size", "4", "--synthetic-size", "16", "--batch-size", "8",
       "--num-workers", "0", "--log-every", "1", "--epochs", "2", "--warmup-epochs", "1",
       "--lr", "1e-3"]
HIERA = ["--model", "hiera_tiny_lite", "--img-size", "64", "--synthetic-size", "8",
         "--batch-size", "4", "--num-workers", "0", "--log-every", "1", "--epochs", "2",
         "--warmup-epochs", "1", "--lr", "1e-3"]
FINETUNE = ["--img-size", "16", "--patch-size", "4", "--synthetic-size", "16", "--max-images",
            "16", "--batch-size", "8", "--num-workers", "0", "--log-every", "1", "--epochs", "2",
            "--warmup-epochs", "1"]


def teacher_file(folder, name, **kw):
    """A deterministic random teacher checkpoint."""
    torch.manual_seed(123)
    model = build_model(name, **kw)
    path = os.path.join(folder, f"{name}.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def losses(log):
    """The losses and accuracies of every log line that has any (the kNN monitor's lines,
    written between epochs, have none)."""
    keys = ("loss", "recon_loss", "distill_loss", "top1", "val_loss")
    rows = [{k: r[k] for k in keys if k in r} for r in log]
    return [row for row in rows if row]


def run_all(folder):
    """Every layout, each a few steps; returns {layout: [per-log-line numbers]}."""
    vit_teacher = teacher_file(folder, "vit_tiny", img_size=16, patch_size=4)
    hiera_teacher = teacher_file(folder, "hiera_tiny_lite", img_size=64, num_classes=0, q_pool=2)
    distil = ["--teacher", vit_teacher, "--teacher-model", "vit_tiny"]
    layouts = {
        "mae": VIT,
        "dmae": VIT + distil + ["--distill-layer", "12"],
        "d2mae": VIT + distil + ["--distill-layer", "12", "--recon-layer", "8"],
        "rep": VIT + distil + ["--distill-target", "rep", "--distill-layer", "6,12"],
        "relation": VIT + distil + ["--distill-target", "relation", "--teacher-input", "full",
                                    "--mask-ratio", "0", "--no-recon"],
        "hiera_mae": HIERA,
        "hiera_distill": HIERA + ["--teacher", hiera_teacher, "--teacher-model",
                                  "hiera_tiny_lite"],
    }
    results = {}
    for name, flags in layouts.items():
        out = os.path.join(folder, name)
        mae.main(flags + ["--out-dir", out])  # the kNN monitor on, as by default
        log = read_log(os.path.join(out, "log.jsonl"))
        assert [r["epoch"] for r in log if "knn_top1" in r] == [1, 2], name
        results[name] = losses(log)
    init = os.path.join(folder, "mae", "checkpoint.pth")
    for name, flags in {"finetune": ["--init", init, "--lr", "1e-3"],
                        "linprobe": ["--init", init, "--recipe", "linprobe", "--lr", "0.1"],
                        "scratch": ["--lr", "1e-3"]}.items():
        out = os.path.join(folder, name)
        finetune.main(FINETUNE + flags + ["--out-dir", out])
        results[name] = losses(read_log(os.path.join(out, "log.jsonl")))
    return results


def record():
    folder = os.path.join(HERE, "_record")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    try:
        results = run_all(folder)
        with open(GOLDEN, "w") as f:
            json.dump(results, f, indent=1)
        # the D^2-MAE checkpoint, every tensor set to a constant: the format, not the values
        ckpt = torch.load(os.path.join(folder, "d2mae", "checkpoint.pth"), weights_only=True)
        constant = lambda t: torch.full_like(t, 0.01) if t.is_floating_point() else t  # noqa
        ckpt["model"] = {k: constant(v) for k, v in ckpt["model"].items()}
        ckpt["distill"] = {k: constant(v) for k, v in ckpt["distill"].items()}
        for state in ckpt["optimizer"]["state"].values():
            for k, v in state.items():
                state[k] = constant(v) if k != "step" else v
        ckpt["args"]["teacher"] = "TEACHER"
        os.makedirs(os.path.dirname(OLD_CHECKPOINT), exist_ok=True)
        raw = os.path.join(folder, "old.pth")
        torch.save(ckpt, raw)
        with open(raw, "rb") as src, gzip.open(OLD_CHECKPOINT, "wb") as dst:
            shutil.copyfileobj(src, dst)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_every_layout_gives_the_recorded_losses(tmp_path):
    with open(GOLDEN) as f:
        golden = json.load(f)
    results = run_all(str(tmp_path))
    assert sorted(results) == sorted(golden)
    for layout, rows in golden.items():
        assert len(results[layout]) == len(rows), layout
        for got, want in zip(results[layout], rows):
            assert got.keys() == want.keys(), layout
            for key in want:
                assert abs(got[key] - want[key]) <= 1e-6 * max(1.0, abs(want[key])), \
                    (layout, key, got[key], want[key])


def test_a_checkpoint_written_before_the_redesign_loads_and_resumes(tmp_path):
    path = str(tmp_path / "old.pth")
    with gzip.open(OLD_CHECKPOINT, "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    backbone = ViT(img_size=16, patch_size=4)
    report = load_pretrained(backbone, path, verbose=False)
    assert not report["initialised"] and torch.all(backbone.blocks[11].attn.qkv.weight == 0.01)
    teacher = teacher_file(str(tmp_path), "vit_tiny", img_size=16, patch_size=4)
    mae.main(VIT + ["--epochs", "3", "--teacher", teacher, "--teacher-model", "vit_tiny",
                    "--distill-layer", "12", "--recon-layer", "8", "--resume", path,
                    "--out-dir", str(tmp_path / "resumed")])
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    old_parts = set(torch.load(path, weights_only=True)["distill"])  # "12.head_map", ...
    assert old_parts == {"12.head_map", "12.extra.norm1.weight", "12.extra.norm1.bias",
                         "12.extra.qkv.weight", "12.extra.qkv.bias"}
    assert resumed["epoch"] == 2 and set(resumed["distill"]) == {
        "head_maps.12", "extra_blocks.12.norm1.weight", "extra_blocks.12.norm1.bias",
        "extra_blocks.12.qkv.weight", "extra_blocks.12.qkv.bias"}


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_same_numbers.py --record")
    record()
    print(f"wrote {GOLDEN} and {OLD_CHECKPOINT}")
