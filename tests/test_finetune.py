"""Fine-tuning: layer decay, reserved blocks, linear probing, loading, recipes end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

import augment
import classifier
import finetune
import loop
import presets
from model import ViT, vit_small, vit_tiny

# vit_tiny at 16 px with patch 4 (16 tokens) on 64 synthetic images: a few seconds per run.
FAST = ["--img-size", "16", "--patch-size", "4", "--synthetic-size", "64", "--batch-size", "16",
        "--num-workers", "0", "--log-every", "1", "--epochs", "2", "--warmup-epochs", "1"]


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def random_vit_file(path, make=vit_tiny, **kw):
    """A checkpoint whose every tensor is random, so a re-initialised one cannot match it."""
    torch.manual_seed(1)
    model = make(img_size=16, patch_size=4, **kw)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save({"model": state}, path)
    return state


def test_layer_decay_groups_by_hand():
    model = ViT(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=5,
                global_pool="avg")
    model.pos_embed.requires_grad_(True)  # trained when fine-tuning, as FAIR's
    groups = loop.param_groups(model, 0.05,
                               lambda n: classifier.layer_decay_scale(n, model.depth, 0.5),
                               no_decay_names=("cls_token", "pos_embed"))
    seen = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    # depth 3, decay 0.5: scale = 0.5 ** (4 - layer); stem layer 0, block i layer i + 1, rest 4
    by_hand = {"cls_token": (0.0625, 0.0), "pos_embed": (0.0625, 0.0),
               "patch_embed.proj.weight": (0.0625, 0.05), "patch_embed.proj.bias": (0.0625, 0.0),
               "blocks.0.attn.qkv.weight": (0.125, 0.05), "blocks.0.norm1.weight": (0.125, 0.0),
               "blocks.1.mlp.fc1.weight": (0.25, 0.05), "blocks.1.mlp.fc1.bias": (0.25, 0.0),
               "blocks.2.attn.proj.weight": (0.5, 0.05), "fc_norm.weight": (1.0, 0.0),
               "head.weight": (1.0, 0.05), "head.bias": (1.0, 0.0)}
    params = dict(model.named_parameters())
    for name, expected in by_hand.items():
        assert seen[id(params[name])] == expected, name
    assert len(seen) == len(params)  # every parameter is in exactly one group
    for name, p in params.items():  # no weight decay on 1-D parameters
        if p.ndim <= 1:
            assert seen[id(p)][1] == 0.0, name


def test_keep_blocks_reinitialises_exactly_the_later_blocks(tmp_path):
    path = str(tmp_path / "init.pth")
    state = random_vit_file(path)
    args = finetune.parse_args((
        FAST + ["--init", path, "--keep-blocks", "5", "--global-pool", "token"]))
    model = classifier.prepare_model(args, 10, torch.device("cpu"))
    now = model.state_dict()
    for key, value in state.items():
        if key.startswith("head."):
            continue  # the classifier head is always new
        later = key.startswith("blocks.") and int(key.split(".")[1]) >= 5
        assert torch.equal(now[key], value) != later, key
    assert torch.all(model.blocks[5].attn.qkv.bias == 0)  # fresh MAE init: zero bias, LN 1
    assert torch.all(model.blocks[11].norm1.weight == 1)


def test_linear_probe_leaves_the_backbone_bit_identical(tmp_path):
    path = str(tmp_path / "init.pth")
    state = random_vit_file(path)
    out = tmp_path / "lin"
    finetune.main(FAST + ["--init", path, "--recipe", "linprobe", "--out-dir", str(out)])
    trained = torch.load(out / "checkpoint.pth")["model"]
    for key, value in state.items():
        if not key.startswith(("head.", "norm.")):  # norm: cls-token pooling keeps it, frozen
            assert torch.equal(trained[key], value), key
    assert torch.equal(trained["norm.weight"], state["norm.weight"])
    assert {"head.0.running_mean", "head.1.weight"} <= set(trained)
    assert not torch.all(trained["head.0.running_mean"] == 0)  # BatchNorm statistics moved


def test_pretraining_checkpoint_drops_decoder_and_reports(tmp_path, capsys):
    model = presets.build_mae("vit_tiny", img_size=16, patch_size=4)
    path = str(tmp_path / "mae.pth")
    torch.save({"model": model.state_dict(), "distill": {"head_map": torch.ones(2)},
                "args": {"model": "vit_tiny", "img_size": 16, "patch_size": 4}}, path)
    args = finetune.parse_args((
        ["--init", path, "--num-workers", "0"]))
    assert (args.img_size, args.patch_size) == (16, 4)  # architecture taken from the file
    vit = classifier.prepare_model(args, 10, torch.device("cpu"))
    out = capsys.readouterr().out
    assert "dropped: mask_token" in out and "decoder_pred.weight" in out
    assert "newly initialised: fc_norm.bias, fc_norm.weight, head.bias, head.weight" in out
    torch.testing.assert_close(vit.blocks[3].attn.qkv.weight, model.blocks[3].attn.qkv.weight)
    assert abs(vit.head.weight.std() - 0.02) < 0.003  # impr: timm's trunc-normal 0.02


@pytest.mark.parametrize("make,words", [(vit_small, "another width"),
                                        (None, "no ViT encoder weights")])
def test_checkpoint_of_another_architecture_is_refused(tmp_path, make, words):
    path = str(tmp_path / "other.pth")
    if make is None:  # e.g. a ResNet
        torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(2, 8)},
                   path)
    else:
        random_vit_file(path, make)
    with pytest.raises(SystemExit, match=words):
        finetune.main(FAST + ["--init", path, "--model", "vit_tiny"])


@pytest.mark.parametrize("flags,message", [
    (["--keep-blocks", "13", "--init", "x.pth"], "must be within 0..12"),
    (["--keep-blocks", "2"], "--keep-blocks needs --init"),
    (["--eval"], "--eval / --export need --init"),
    (["--layer-decay", "1.5"], "must be in (0, 1]"),
    (["--lr", "0.1,x"], "must be a number"),
])
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        finetune.main(FAST + flags)
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """One short impr fine-tune (RandAugment, mixup + cutmix, rel-pos off), reused below."""
    out = tmp_path_factory.mktemp("ft")
    rows = finetune.main(FAST + ["--out-dir", str(out), "--mixup", "0.2", "--cutmix", "1.0",
                                 "--reprob", "0.25", "--drop-path", "0.1"])
    return out, rows[0][1]


def test_eval_reproduces_the_logged_accuracy(finetuned):
    out, result = finetuned
    assert (out / "curves.png").stat().st_size > 0  # written at the end of every run
    epochs = [r for r in read_log(out / "log.jsonl") if "top1" in r]
    assert len(epochs) == 2 and epochs[-1]["best_top1"] == result["best_top1"]
    best = max(epochs, key=lambda r: r["top1"])
    evaluated = finetune.main(["--init", str(out / "best.pth"), "--eval", "--num-workers", "0",
                               "--synthetic-size", "64"])
    assert evaluated["top1"] == best["top1"] and evaluated["top5"] == best["top5"]


def test_resume_is_exact(tmp_path):
    # 2 epochs straight through (mixup and RandAugment on, one worker) vs epoch 1 + resume.
    run = FAST + ["--mixup", "0.2", "--num-workers", "1", "--save-every", "1"]
    finetune.main(run + ["--out-dir", str(tmp_path / "straight")])
    finetune.main(run + ["--out-dir", str(tmp_path / "resumed"),
                         "--resume", str(tmp_path / "straight" / "checkpoint-1.pth")])
    straight = read_log(tmp_path / "straight" / "log.jsonl")
    resumed = read_log(tmp_path / "resumed" / "log.jsonl")
    assert [r["step"] for r in resumed if "loss" in r] == [5, 6, 7, 8]
    tail = [r for r in straight if r["step"] > 4]
    assert len(tail) == len(resumed)
    for x, y in zip(tail, resumed):
        for key in ("loss", "top1", "val_loss"):
            if key in x:
                assert abs(x[key] - y[key]) < 1e-5, (key, x, y)
    a = torch.load(tmp_path / "straight" / "checkpoint.pth")["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def test_transfer_sweep_runs_each_lr(tmp_path, capsys):
    rows = finetune.main(FAST + ["--recipe", "transfer", "--lr", "0.01,0.1", "--epochs", "1",
                                 "--warmup-epochs", "0", "--out-dir", str(tmp_path)])
    assert [lr for lr, _ in rows] == [0.01, 0.1]
    assert (tmp_path / "lr0.01" / "best.pth").exists() and (tmp_path / "lr0.1" / "best.pth").exists()
    assert "best top-1" in capsys.readouterr().out
    args = torch.load(tmp_path / "lr0.1" / "checkpoint.pth")["args"]
    assert args["opt"] == "sgd" and args["weight_decay"] == 0.0 and args["rand_aug"] == 0


def test_rel_pos_fine_tune_and_eval(tmp_path):
    finetune.main(FAST + ["--rel-pos", "--epochs", "1", "--out-dir", str(tmp_path)])
    state = torch.load(tmp_path / "best.pth")["model"]
    assert state["blocks.0.attn.relative_position_bias_table"].abs().sum() > 0  # it trained
    logged = read_log(tmp_path / "log.jsonl")[-1]["top1"]
    evaluated = finetune.main(["--init", str(tmp_path / "best.pth"), "--eval", "--num-workers",
                               "0", "--synthetic-size", "64"])
    assert evaluated["top1"] == logged


def test_export_hub_folder_loads_in_timm_with_the_same_logits(finetuned, tmp_path):
    """--export DIR writes timm's hub layout; timm builds the model from config.json (12 heads,
    not its vit_tiny's 3) and loads model.safetensors; nanoMIM reads the folder back too."""
    timm = pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    out, _ = finetuned
    folder = tmp_path / "hub"
    finetune.main(["--init", str(out / "best.pth"), "--export", str(folder)])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"]["num_heads"] == 12 and config["num_classes"] == 10
    weights = dict(file=str(folder / "model.safetensors"), num_classes=10)
    theirs = timm.create_model(config["architecture"], pretrained=True,
                               pretrained_cfg_overlay=weights, **config["model_args"])
    assert theirs.blocks[0].attn.num_heads == 12
    model = ViT(img_size=16, patch_size=4, num_classes=10, global_pool="avg")
    model.load_state_dict(torch.load(out / "best.pth")["model"])
    imgs = torch.randn(2, 3, 16, 16)
    expected = model.eval()(imgs)
    torch.testing.assert_close(theirs.eval()(imgs), expected, atol=1e-5, rtol=1e-5)
    if hasattr(timm.models, "load_model_config_from_path"):  # timm >= 1.0.16: local-dir:
        local = timm.create_model(f"local-dir:{folder}", pretrained=True)
        torch.testing.assert_close(local.eval()(imgs), expected, atol=1e-5, rtol=1e-5)
    back = finetune.main(["--init", str(folder / "model.safetensors"), "--eval", "--num-workers",
                          "0", "--synthetic-size", "64"])  # architecture from config.json
    again = finetune.main(["--init", str(out / "best.pth"), "--eval", "--num-workers", "0",
                           "--synthetic-size", "64"])
    assert back["top1"] == again["top1"] and back["val_loss"] == pytest.approx(again["val_loss"])


def test_export_to_a_file_path_is_refused(finetuned, tmp_path):
    out, _ = finetuned
    (tmp_path / "x.pth").write_text("")
    with pytest.raises(SystemExit, match="give a folder"):
        finetune.main(["--init", str(out / "best.pth"), "--export", str(tmp_path / "x.pth")])


def test_export_checks_the_destination_before_the_package(finetuned, tmp_path, monkeypatch):
    out, _ = finetuned
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if not installed
    with pytest.raises(SystemExit, match="give a folder"):
        finetune.main(["--init", str(out / "best.pth"), "--export", str(tmp_path / "x.pth")])
    with pytest.raises(SystemExit, match="pip install safetensors"):
        finetune.main(["--init", str(out / "best.pth"), "--export", str(tmp_path / "hub")])
    assert not (tmp_path / "hub").exists()


def test_lars_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = loop.LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    opt.step()
    update = torch.tensor([[0.3, 1.4]])  # g + wd * w
    trust = 0.01 * 5 / update.norm()
    torch.testing.assert_close(w.data, torch.tensor([[3.0, 4.0]]) - 0.5 * trust * update)
    torch.testing.assert_close(b.data, torch.tensor([0.0]))  # 1-D: plain SGD, 1 - 0.5 * 2


def test_mixing_gives_probability_targets():
    args = finetune.parse_args((
        ["--mixup", "0.8", "--cutmix", "1.0"]))
    imgs, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    mixed, targets = augment.build_mixing(args, 10)(imgs, labels)
    assert mixed.shape == imgs.shape and targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))


def test_short_fine_tune_learns_fashion_mnist(tmp_path, fmnist_slice):
    rows = finetune.main(["--data", "fashion_mnist", "--data-root", fmnist_slice,
                          "--max-images", "1000", "--img-size", "32",
                          "--patch-size", "8", "--batch-size", "32", "--epochs", "3",
                          "--warmup-epochs", "1", "--blr", "4e-3", "--rand-aug", "0",
                          "--mixup", "0", "--layer-decay", "1", "--num-workers", "0",
                          "--log-every", "100", "--out-dir", str(tmp_path)])
    assert rows[0][1]["best_top1"] > 30  # chance is 10%


@pytest.mark.parametrize("recipe", ["impr", "linprobe"])  # all parameters train / head only
def test_ddp_under_torchrun_on_cpu(tmp_path, recipe):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "finetune.py", *FAST, "--epochs", "1", "--recipe", recipe, "--out-dir", str(tmp_path)],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stdout and "batch 32" in result.stdout
    epoch = read_log(tmp_path / "log.jsonl")[-1]
    assert epoch["images"] == 16  # the 16 validation images, split over both ranks, summed


def test_bf16_autocast_with_rel_pos_runs_on_cpu(tmp_path):
    finetune.main(FAST + ["--epochs", "1", "--precision", "bf16", "--rel-pos", "--out-dir",
                          str(tmp_path)])
    log = read_log(tmp_path / "log.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)


def test_eval_of_a_keep_blocks_fine_tune_scores_it_as_trained(tmp_path, capsys):
    """The file holds every block (the kept ones and those re-drawn and trained): --eval reads
    them all, and a --keep-blocks typed again would re-draw the later ones, so it is refused."""
    path = str(tmp_path / "init.pth")
    random_vit_file(path)
    out = tmp_path / "keep2"
    finetune.main(FAST + ["--init", path, "--keep-blocks", "2", "--epochs", "1",
                          "--warmup-epochs", "0", "--out-dir", str(out)])
    ckpt = str(out / "checkpoint.pth")
    args = finetune.parse_args(["--init", ckpt, "--eval"])
    assert args.keep_blocks is None
    model = classifier.prepare_model(args, 10, torch.device("cpu"))
    saved = torch.load(ckpt)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    with pytest.raises(SystemExit):
        finetune.parse_args(["--init", ckpt, "--eval", "--keep-blocks", "2"])
    assert "drop --keep-blocks 2" in capsys.readouterr().err
