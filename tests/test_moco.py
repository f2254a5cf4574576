"""MoCo-v3: the loss by hand, the momentum and its schedule, the two views, exact resume, DDP."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

import augment
import finetune
import moco
import plumbing
from model import ViT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# vit_tiny at 16 px, patch 4 (16 patches), small heads, 32 synthetic images: seconds per run.
FAST = ["--img-size", "16", "--patch-size", "4", "--synthetic-size", "32", "--batch-size", "8",
        "--mlp-dim", "32", "--out-dim", "16", "--num-workers", "0", "--log-every", "1",
        "--compile", "off"]


def read_log(path):
    """The step lines of a run's log.jsonl (the kNN monitor's epoch lines left out)."""
    return [row for row in map(json.loads, open(path)) if "loss" in row]


def test_contrastive_loss_by_hand():
    torch.manual_seed(0)
    q, k, t = torch.randn(3, 4), torch.randn(3, 4), 0.2
    expected = 0.0
    for i in range(3):
        qi = q[i] / q[i].norm()
        sims = [float(qi @ (k[j] / k[j].norm())) / t for j in range(3)]
        expected += -(sims[i] - math.log(sum(math.exp(s) for s in sims))) / 3
    expected *= 2 * t
    assert moco.contrastive_loss(q, k, t).item() == pytest.approx(expected, rel=1e-5)
    # chance level: identical keys for every query give 2 t ln(B)
    same = moco.contrastive_loss(torch.ones(8, 4), torch.ones(8, 4), t).item()
    assert same == pytest.approx(2 * t * math.log(8), rel=1e-5)


def test_momentum_schedule_and_update():
    assert moco.momentum_at(0, 100) == pytest.approx(0.99)
    assert moco.momentum_at(50, 100) == pytest.approx(0.995)
    assert moco.momentum_at(100, 100) == pytest.approx(1.0)
    encoder = ViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    model = moco.MoCo(encoder, out_dim=8, mlp_dim=16)
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    before = {k: v.clone() for k, v in model.momentum_encoder.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.update_momentum(0.9)
    for name, p in model.momentum_encoder.named_parameters():
        current = dict(model.encoder.named_parameters())[name]
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * current)


def test_heads_are_the_references():
    head = moco.mlp(3, 192, 4096, 256)
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    norms = [m for m in head if isinstance(m, torch.nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features, m.bias) for m in linears] == [
        (192, 4096, None), (4096, 4096, None), (4096, 256, None)]
    assert [n.affine for n in norms] == [True, True, False]
    assert sum(isinstance(m, torch.nn.ReLU) for m in head) == 2


def test_the_two_views_are_the_references():
    img = Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy())
    views = augment.MocoViews(16)
    pair = views(img)
    assert pair.shape == (2, 3, 16, 16) and not torch.equal(pair[0], pair[1])

    def applied(view):  # {op class name: probability} of the RandomApply wrappers
        return {type(t.transforms[0]).__name__: t.p for t in view.transforms
                if type(t).__name__ == "RandomApply"}
    assert applied(views.view1) == {"ColorJitter": 0.8, "RandomBlur": 1.0, "Solarize": 0.0}
    assert applied(views.view2) == {"ColorJitter": 0.8, "RandomBlur": 0.1, "Solarize": 0.2}
    jitter = views.view1.transforms[1].transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    assert views.view1.transforms[0].scale == (0.08, 1.0)
    assert augment.Solarize()(img).tobytes() == ImageOps.solarize(img).tobytes()
    torch.manual_seed(0)
    import random
    random.seed(3)
    sigma = random.uniform(0.1, 2.0)
    random.seed(3)
    assert augment.RandomBlur()(img).tobytes() == img.filter(
        ImageFilter.GaussianBlur(radius=sigma)).tobytes()


def test_run_resume_and_outputs(tmp_path):
    # 2 epochs of 4 steps straight through, against epoch 2 resumed from checkpoint-1.pth
    run = FAST + ["--epochs", "2", "--save-every", "1", "--num-workers", "1"]
    moco.main(run + ["--out-dir", str(tmp_path / "straight")])
    first = tmp_path / "straight" / "checkpoint-1.pth"
    ckpt = torch.load(first)
    assert set(ckpt) >= {"model", "moco", "optimizer", "scaler", "args"}
    assert all(k.startswith(("cls_token", "pos_embed", "patch_embed", "blocks", "norm"))
               for k in ckpt["model"])  # the plain backbone
    moco.main(run + ["--resume", str(first), "--out-dir", str(tmp_path / "resumed")])
    straight = read_log(tmp_path / "straight" / "log.jsonl")
    resumed = read_log(tmp_path / "resumed" / "log.jsonl")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for a, b in zip(straight[4:], resumed):
        assert a["lr"] == b["lr"] and a["momentum"] == b["momentum"]
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
    assert (tmp_path / "straight" / "curves.png").exists()
    # the backbone is what fine-tuning reads; a MoCo checkpoint brings layer decay 0.75
    last = str(tmp_path / "straight" / "checkpoint.pth")
    args = finetune.parse_args(["--init", last])
    assert args.layer_decay == 0.75 and args.img_size == 16 and args.patch_size == 4
    finetune.main(["--init", last, "--synthetic-size", "32", "--batch-size", "8", "--epochs", "1",
                   "--num-workers", "0", "--out-dir", str(tmp_path / "ft")])


GATHER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import moco
torch.manual_seed(0)
q, k = torch.randn(8, 5), torch.randn(8, 5)
single = moco.contrastive_loss(q, k, 0.2).item()  # one process, the whole batch
dist.init_process_group("gloo")
rank = dist.get_rank()
mine = slice(4 * rank, 4 * rank + 4)
loss = moco.contrastive_loss(q[mine], k[mine], 0.2)  # negatives: both processes' keys
dist.all_reduce(loss)
if rank == 0:
    print("global", (loss / 2).item(), "single", single)
dist.destroy_process_group()
"""


def test_negatives_come_from_every_process(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER.format(root=ROOT))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", str(script)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    words = result.stdout.split()
    assert float(words[words.index("global") + 1]) == pytest.approx(
        float(words[words.index("single") + 1]), rel=1e-6)


def test_moco_under_torchrun_on_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "moco.py", *FAST, "--epochs", "1", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stdout and "batch 16" in result.stdout
    assert len(read_log(tmp_path / "log.jsonl")) == 2  # 32 images / (2 x 8) a step


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "--temperature 0.0 must be greater than 0"),
    (["--momentum", "1.5"], "--momentum 1.5 must be in [0, 1]"),
    (["--batch-size", "1"], "--batch-size 1 must be at least 2"),
    (["--img-size", "30"], "not a multiple of --patch-size"),
])
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        moco.main(flags)
    assert message in capsys.readouterr().err


def test_resuming_another_scripts_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "mae.pth"
    torch.save({"model": {}, "args": {"mask_ratio": 0.75}}, path)
    with pytest.raises(SystemExit):
        moco.main(["--resume", str(path)])
    assert "is a mae.py checkpoint" in capsys.readouterr().err
    assert plumbing.checkpoint_script({"temperature": 0.2}) == "moco.py"
