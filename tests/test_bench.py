"""bench.py's FLOP count against a hand count of every matmul (the oracle: the architecture's
shapes, multiplied out here), on the CPU, where FlopCounterMode alone counts SDPA as 0."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
import model


def blocks_macs(tokens, dim, depth, mlp_ratio=4):
    """Multiply-adds of `depth` Transformer blocks over `tokens` tokens of width `dim` (any
    number of heads: heads x N x N x head width = N^2 x dim)."""
    qkv = tokens * dim * 3 * dim
    scores = tokens * tokens * dim  # q k^T
    mix = tokens * tokens * dim  # attention @ v
    proj = tokens * dim * dim
    mlp = tokens * dim * mlp_ratio * dim + tokens * mlp_ratio * dim * dim  # fc1, fc2
    return depth * (qkv + scores + mix + proj + mlp)


def bench_args(img_size=224, patch_size=16):
    return bench.get_parser().parse_args(["--img-size", str(img_size),
                                          "--patch-size", str(patch_size)])


def test_one_sdpa_call_is_counted_by_formula():
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 3, 197, 64, requires_grad=True)  # (B, heads, N, head width)
    counter = FlopCounterMode(display=False, custom_mapping=bench.SDPA_CPU_FLOPS)
    with counter:
        out = F.scaled_dot_product_attention(q, q, q)
    forward = counter.get_total_flops()
    assert forward == 2 * 2 * 3 * 197 * 197 * 64  # q k^T and attention @ v: 29.8 M
    with counter:  # counts anew
        out.sum().backward()
    assert counter.get_total_flops() == 2 * forward  # backward: twice the forward


def test_vit_tiny_forward_at_224_equals_the_hand_count():
    patches = 196
    macs = (patches * (16 * 16 * 3) * 192  # patch embedding
            + blocks_macs(197, 192, 12)  # 196 patches + the cls token
            + 192 * 1000)  # head, on the pooled token
    counted = bench.count_flops("infer", bench_args())
    assert counted == pytest.approx(2 * macs, rel=0.01)
    assert 2.50e9 < counted < 2.52e9  # 1.25 GMACs, the papers' "1.3 G"


def test_mae_tiny_training_step_at_224_equals_the_hand_count():
    patches = 196
    visible = 49 + 1  # 25% of the patches + the cls token
    patch_embed = patches * (16 * 16 * 3) * 192  # every patch is embedded, then masked (FAIR)
    forward = (patch_embed
               + blocks_macs(visible, 192, 12)  # encoder
               + visible * 192 * 96  # decoder_embed
               + blocks_macs(patches + 1, 96, 1)  # MAE-Tiny decoder: 1 block, width 96
               + (patches + 1) * 96 * (16 * 16 * 3))  # decoder_pred
    # backward: a gradient for the input and one for the weight of every product (2 x forward),
    # except the patch embedding, whose input (the image) needs none
    macs = 3 * forward - patch_embed
    assert bench.count_flops("mae", bench_args()) == pytest.approx(2 * macs, rel=0.01)


@pytest.mark.parametrize("name", ["mae", "finetune"])
def test_the_count_is_the_same_through_either_attention_path(name, monkeypatch):
    # SDPA counted by formula == the explicit q k^T / softmax / @ v products counted as matmuls
    args = bench_args(32, 8)
    fused = bench.count_flops(name, args)
    monkeypatch.setattr(model, "slow_sdpa", lambda q: True)  # every block: the explicit path
    assert bench.count_flops(name, args) == fused


def test_the_prepared_gpu_check_runs_every_part_at_toy_sizes(tmp_path):
    """gpu_check.sh with SMALL=1 on CPU: each part writes its file, and the summary sets the
    step against each loader (the numbers themselves mean nothing here)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OUT=str(tmp_path), SMALL="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", "gpu_check.sh"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("step_b2.json", "step_b4.json", "loaders.json", "summary.txt", "progress.txt"):
        assert (tmp_path / name).is_file(), name
    summary = (tmp_path / "summary.txt").read_text()
    assert "MAE step batch 4, compile False" in summary and "x the timm-built step" in summary
    loaders = [line.split(",")[0] for line in summary.splitlines() if line.startswith("loader ")]
    assert loaders == ["loader pil", "loader device", "loader device_batched", "loader dali"]
    assert "5. done" in (tmp_path / "progress.txt").read_text()
