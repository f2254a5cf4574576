"""Checkpoint safety and interoperability: weights_only loading, safetensors and timm's hub files,
head counts, precision selection and fp16 loss scaling, warm starts, --resume auto, warmup."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import finetune
import loop
import mae
import mae_model
import plumbing
from hiera import Hiera
from checkpoints import CheckpointError, load_pretrained, read_state_dict
from presets import build_model
from model import ViT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
# A tiny synthetic pre-training run: 32 px, patch 8, 64 images, a few seconds.
MAE_RUN = ["--data", "synthetic", "--img-size", "32", "--patch-size", "8", "--synthetic-size",
           "64", "--batch-size", "16", "--num-workers", "0", "--log-every", "1", "--epochs", "2",
           "--compile", "off"]


class CreatesAFile:
    """A pickle that, when unpickled in full, creates the file at `path` (os.system is enough to
    show that loading a checkpoint can run code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# ----------------------------------------------------------------------------------------------
# 1. weights_only loading with an allow-list


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "created"
    path = str(tmp_path / "evil.pth")
    torch.save({"model": ViT(**TINY_VIT).state_dict(), "payload": CreatesAFile(marker)}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint") as err:
        load_pretrained(ViT(**TINY_VIT), path, verbose=False)
    assert "posix.system" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_a_fair_training_file_with_its_namespace_loads(tmp_path):
    source = ViT(**TINY_VIT)
    path = str(tmp_path / "fair.pth")  # FAIR MAE's util/misc.py save_model layout
    torch.save({"model": source.state_dict(), "optimizer": {}, "epoch": 399, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_base_patch16", lr=1.5e-4)}, path)
    target = ViT(**TINY_VIT)
    report = load_pretrained(target, path, verbose=False)
    assert not report["initialised"]
    torch.testing.assert_close(target.state_dict(), source.state_dict())


def test_trust_checkpoint_unpickles_other_objects_and_says_so(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    path = str(tmp_path / "numpy.pth")
    torch.save({"model": ViT(**TINY_VIT).state_dict(), "best_acc": np.float64(71.2)}, path)
    with pytest.raises(CheckpointError, match="numpy"):
        read_state_dict(path)
    assert "blocks.0.attn.qkv.weight" in read_state_dict(path, trust=True)
    assert "--trust-checkpoint" in capsys.readouterr().out


def test_the_trust_flag_reaches_the_scripts(tmp_path):
    marker = tmp_path / "created"
    path = str(tmp_path / "evil.pth")
    torch.save({"model": ViT(**TINY_VIT).state_dict(), "payload": CreatesAFile(marker)}, path)
    with pytest.raises(SystemExit, match="--trust-checkpoint"):
        finetune.main(["--init", path, "--eval", "--num-workers", "0"])
    with pytest.raises(SystemExit, match="--trust-checkpoint"):
        mae.main(MAE_RUN + ["--init", path, "--out-dir", str(tmp_path / "run")])
    assert not marker.exists()


def test_non_finite_weights_are_refused(tmp_path):
    state = ViT(**TINY_VIT).state_dict()
    state["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_pretrained(ViT(**TINY_VIT), state, verbose=False)


# ----------------------------------------------------------------------------------------------
# 2. safetensors and timm's hub files


def test_timm_safetensors_vit_gives_timm_features(tmp_path):
    timm = pytest.importorskip("timm")
    save_file = pytest.importorskip("safetensors.torch").save_file
    theirs = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0).eval()
    path = str(tmp_path / "model.safetensors")
    save_file(theirs.state_dict(), path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "model_args": {"num_heads": 4}}))
    ours = ViT(**TINY_VIT).eval()
    report = load_pretrained(ours, path, verbose=False)
    assert not report["initialised"] and not report["dropped"]
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(imgs), theirs(imgs), atol=1e-5, rtol=1e-5)


def test_timm_hiera_safetensors_keys_load_into_our_hiera(tmp_path):
    timm_hiera = pytest.importorskip("timm.models.hiera")
    save_file = pytest.importorskip("safetensors.torch").save_file
    cfg = dict(embed_dim=8, num_heads=1, stages=(1, 1, 2, 1), num_classes=5)
    theirs = timm_hiera.Hiera(img_size=(64, 64), **cfg).eval()
    assert any(k.startswith("head.fc.") for k in theirs.state_dict())  # timm's own names
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, path)
    ours = Hiera(img_size=64, **cfg).eval()
    report = load_pretrained(ours, path, verbose=False)
    assert not report["initialised"]
    imgs = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(imgs), theirs(imgs), atol=1e-5, rtol=1e-5)


def test_a_damaged_safetensors_file_is_one_line(tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="damaged"):
        read_state_dict(str(path))


# ----------------------------------------------------------------------------------------------
# 3. head counts: the papers' 12-head ViT-Tiny vs DeiT's 3-head one


def tiny_shaped(heads):
    return build_model("vit_tiny" if heads == 12 else "deit_tiny", img_size=32, patch_size=16)


def test_a_3_head_file_is_refused_by_the_12_head_preset(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    path = str(tmp_path / "model.safetensors")
    save_file(tiny_shaped(3).state_dict(), path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    with pytest.raises(CheckpointError, match="3 attention heads.*--model deit_tiny"):
        load_pretrained(tiny_shaped(12), path, verbose=False)
    load_pretrained(tiny_shaped(3), path, verbose=False)  # the right preset loads


def test_our_checkpoints_state_their_head_count(tmp_path):
    path = str(tmp_path / "ours.pth")
    torch.save({"model": tiny_shaped(3).state_dict(), "args": {"model": "deit_tiny"}}, path)
    with pytest.raises(CheckpointError, match="--model deit_tiny"):
        load_pretrained(tiny_shaped(12), path, verbose=False)


def test_a_tiny_shaped_file_of_unknown_origin_gets_a_visible_note(tmp_path, capsys):
    path = str(tmp_path / "plain.pth")
    torch.save(tiny_shaped(3).state_dict(), path)
    load_pretrained(tiny_shaped(12), path, verbose=False)
    note = capsys.readouterr().out
    assert "heads" in note and "deit_tiny (3 heads)" in note
    load_pretrained(ViT(**TINY_VIT), ViT(**TINY_VIT).state_dict(), verbose=False)
    assert "heads" not in capsys.readouterr().out  # no preset of that shape: nothing to say


def test_deit_tiny_matches_timm_vit_tiny():
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).eval()
    ours = build_model("deit_tiny", img_size=32, patch_size=16).eval()
    load_pretrained(ours, theirs.state_dict(), verbose=False, heads=(3, "timm"))
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(imgs), theirs(imgs), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# 4. precision


@pytest.mark.parametrize("bf16, asked, expected", [
    (True, "auto", "bf16"), (False, "auto", "fp16"), (True, "fp16", "fp16"),
    (False, "fp32", "fp32")])
def test_precision_follows_the_gpu(monkeypatch, bf16, asked, expected):
    calls = []

    def supported(including_emulation=True):
        calls.append(including_emulation)
        return bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert plumbing.resolve_precision(asked, torch.device("cuda", 0)) == expected
    assert calls == [False]  # emulated bf16 (V100) does not count
    assert plumbing.resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(plumbing.RunError, match="V100.*--precision fp16"):
        plumbing.resolve_precision("bf16", torch.device("cuda", 0))


def test_fp16_steps_are_loss_scaled_and_skip_overflow():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = plumbing.grad_scaler("fp16", torch.device("cpu"))
    assert scaler.is_enabled() and not plumbing.grad_scaler("bf16", torch.device("cpu")).is_enabled()
    before = model.weight.detach().clone()
    scaler.scale(model(torch.ones(2, 4)).sum()).backward()
    assert model.weight.grad.abs().max() > 1000  # scaled by 2^16
    loop.optimizer_step(opt, clip_grad=1.0, scaler=scaler)  # unscaled, then clipped
    assert (model.weight - before).norm() <= 0.1 + 1e-6
    before = model.weight.detach().clone()
    scaler.scale(model(torch.full((2, 4), float("inf"))).sum()).backward()
    loop.optimizer_step(opt, scaler=scaler)
    torch.testing.assert_close(model.weight, before)  # the overflowed step was skipped
    assert scaler.get_scale() == 2.0 ** 15


def test_an_fp16_run_saves_and_resumes_its_scaler(tmp_path):
    mae.main(MAE_RUN + ["--precision", "fp16", "--out-dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pth")
    assert ckpt["scaler"]["scale"] > 0
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "knn_top1" not in r)


# ----------------------------------------------------------------------------------------------
# 5. warm starts, --resume auto, warmup


def test_init_warm_start_reports_what_came_from_the_file(tmp_path, capsys):
    first = tmp_path / "first"
    mae.main(MAE_RUN + ["--epochs", "1", "--out-dir", str(first)])
    full = torch.load(first / "checkpoint.pth")["model"]
    mae.main(MAE_RUN + ["--epochs", "1", "--init", str(first / "checkpoint.pth"),
                        "--out-dir", str(tmp_path / "full")])
    assert "the decoder came from the file" in capsys.readouterr().out
    encoder = str(tmp_path / "encoder.pth")
    torch.save({"model": {k: v for k, v in full.items()
                          if not k.startswith(mae_model.DECODER_PREFIXES)}}, encoder)
    mae.main(MAE_RUN + ["--epochs", "1", "--init", encoder, "--out-dir", str(tmp_path / "enc")])
    assert "the decoder starts from its initialisation" in capsys.readouterr().out
    log = [r for r in map(json.loads, open(tmp_path / "enc" / "log.jsonl")) if "loss" in r]
    assert log[0]["step"] == 1  # a fresh schedule, not the first run's


def test_init_loads_the_weights_it_reports():
    args = mae.parse_args(MAE_RUN)
    source, _ = mae.build_training_module(args, torch.device("cpu"))
    target, _ = mae.build_training_module(args, torch.device("cpu"))
    mae.warm_start(target, source.state_dict())
    torch.testing.assert_close(target.state_dict(), source.state_dict())


def test_resume_auto_starts_then_continues(tmp_path, capsys):
    run = MAE_RUN + ["--resume", "auto", "--out-dir", str(tmp_path)]
    mae.main(run[:run.index("--epochs")] + ["--epochs", "1"] + run[run.index("--epochs") + 2:])
    assert "starting a new run" in capsys.readouterr().out
    mae.main(run)  # the same command, relaunched with --epochs 2: continues at epoch 2
    out = capsys.readouterr().out
    assert "continuing from" in out and "resumed from" in out and "at epoch 1" in out


def test_finetune_resume_auto_finds_the_checkpoint(tmp_path):
    argv = ["--resume", "auto", "--out-dir", str(tmp_path)]
    assert finetune.parse_args(argv).resume is None  # nothing yet: a new run
    torch.save({"model": {}, "args": {"recipe": "impr", "epochs": 3}}, tmp_path / "checkpoint.pth")
    args = finetune.parse_args(argv)
    assert args.resume == str(tmp_path / "checkpoint.pth") and args.epochs == 3  # its run's flags


def test_warmup_defaults_to_the_recipes_fraction():
    real = ["--data", "imagefolder", "--data-root", ROOT, "--epochs", "10"]
    assert mae.parse_args(real).warmup_epochs == 1  # 10% of 10, as 40 of 400
    assert mae.parse_args(real[:-1] + ["400"]).warmup_epochs == 40
    with pytest.raises(SystemExit):
        mae.parse_args(real + ["--warmup-epochs", "40"])
    assert finetune.parse_args(real).warmup_epochs == 0  # impr: 5 of 300
    assert finetune.parse_args(real[:-1] + ["300"]).warmup_epochs == 5
    assert finetune.parse_args(real + ["--recipe", "transfer"]).warmup_epochs == 2  # 20 of 100


# ----------------------------------------------------------------------------------------------
# 7. exact distributed evaluation


def test_distributed_eval_counts_each_image_once(tmp_path):
    """2 processes on 15 validation images: the top-1 and loss of 1 process, not of 16."""
    run = ["--img-size", "16", "--patch-size", "4", "--synthetic-size", "64", "--batch-size", "4",
           "--num-workers", "0", "--epochs", "1", "--warmup-epochs", "0", "--out-dir",
           str(tmp_path), "--compile", "off"]
    finetune.main(run)
    evaluate = ["--init", str(tmp_path / "checkpoint.pth"), "--eval", "--max-images", "15",
                "--num-workers", "0", "--synthetic-size", "64", "--batch-size", "4"]
    alone = finetune.main(evaluate)
    assert alone["images"] == 15
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "finetune.py", *evaluate], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"top-1 {alone['top1']:.2f}%, top-5 {alone['top5']:.2f}% on 15 " in result.stdout


# ----------------------------------------------------------------------------------------------
# What the review of this change found


def test_an_fp16_resume_of_a_run_without_fp16_and_the_scale_carried_on(tmp_path):
    run = MAE_RUN + ["--save-every", "1", "--out-dir", str(tmp_path / "a")]
    mae.main(run[:run.index("--epochs")] + ["--epochs", "1"] + run[run.index("--epochs") + 2:]
             + ["--precision", "fp32"])  # an empty scaler state, as on an A100 in bf16
    mae.main(run + ["--resume", "auto", "--precision", "fp16"])  # requeued on an older GPU
    scale = torch.load(tmp_path / "a" / "checkpoint.pth")["scaler"]
    assert scale["scale"] > 0
    fp16 = MAE_RUN + ["--precision", "fp16", "--save-every", "1"]
    mae.main(fp16 + ["--out-dir", str(tmp_path / "straight")])
    mae.main(fp16 + ["--out-dir", str(tmp_path / "resumed"), "--resume",
                     str(tmp_path / "straight" / "checkpoint-1.pth")])
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth")["scaler"]
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pth")["scaler"]
    assert straight == resumed  # the scale and its growth tracker went on


def test_a_relaunched_warm_start_with_resume_auto_continues(tmp_path, capsys):
    first = tmp_path / "first"
    mae.main(MAE_RUN + ["--epochs", "1", "--out-dir", str(first)])
    argv = MAE_RUN + ["--init", str(first / "checkpoint.pth"), "--resume", "auto", "--out-dir",
                      str(tmp_path / "warm")]
    assert mae.parse_args(argv).init is not None  # first launch: a warm start
    (tmp_path / "warm").mkdir()
    torch.save(torch.load(first / "checkpoint.pth"), tmp_path / "warm" / "checkpoint.pth")
    args = mae.parse_args(argv)  # relaunched after a preemption: continues, --init not read
    assert args.init is None and args.resume.endswith("checkpoint.pth")
    with pytest.raises(SystemExit):
        finetune.parse_args(["--recipe", "transfer", "--resume", "auto"])  # a sweep of 3 lrs
    assert "give each lr its own run" in capsys.readouterr().err


def test_timm_training_files_state_their_3_heads(tmp_path):
    path = str(tmp_path / "timm_train.pth")  # timm's train.py: args.model is timm's name
    torch.save({"state_dict": tiny_shaped(3).state_dict(),
                "args": argparse.Namespace(model="vit_tiny_patch16_224")}, path)
    with pytest.raises(CheckpointError, match="3 attention heads.*--model deit_tiny"):
        load_pretrained(tiny_shaped(12), path, verbose=False)
    load_pretrained(tiny_shaped(3), path, verbose=False)


def test_safetensors_is_optional(tmp_path, monkeypatch):
    result = subprocess.run([sys.executable, "-c", "import sys, model; print('safetensors' in "
                             "sys.modules)"], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "False"  # model.py imports torch alone
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match="pip install safetensors"):
        read_state_dict(str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="is a folder: give the file inside"):
        read_state_dict(str(tmp_path))
