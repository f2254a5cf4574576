"""The CUDA paths, on a GPU: `python -m pytest -m cuda` (every test here is skipped without one).

One step of each training objective in bf16, eager and compiled, against fp32; SDPA's kernels
against the explicit attention in bf16; the device loader's nvJPEG decode against the CPU's;
fp16 with loss scaling; a one-process torchrun over NCCL (MAE, and MoCo's SyncBatchNorm);
exact resume under --deterministic. The oracle of each is the same computation in fp32 eager
(TF32 off) or on the CPU.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dali_loader
import data
import device_loader
import distill
import hiera_mae
import mae_model
from model import Attention, ViT

pytestmark = pytest.mark.cuda
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda", 0)
# Head width 16 everywhere, as ViT-Tiny's (192 / 12).
STUDENT = dict(embed_dim=64, depth=4, num_heads=4, img_size=32, patch_size=4, decoder_dim=32,
               decoder_depth=1, decoder_heads=2)
TEACHER = dict(embed_dim=128, depth=4, num_heads=8, img_size=32, patch_size=4)
OBJECTIVES = ("mae", "dmae", "d2mae", "relation", "hiera_mae", "finetune")
# bf16 keeps 8 bits of mantissa (a rounding error of 0.4% per operation): a loss of a few
# hundred such operations stays within 2% of fp32. Compiled fp32 reorders sums only.
BF16_RTOL = 0.02
COMPILED_FP32_RTOL = 1e-4


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 (no TF32) while a test runs; the caller's setting is restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def objective(name):
    """(module on CUDA, loss of a module) for one training objective, on fixed inputs."""
    torch.manual_seed(0)
    imgs = torch.randn(8, 3, 32, 32, device=CUDA)
    noise = torch.rand(8, 64, device=CUDA)  # the same mask in every precision
    if name == "hiera_mae":
        model = hiera_mae.HieraMAE(embed_dim=32, num_heads=2, stages=(1, 1, 2, 1), img_size=64,
                                   decoder_dim=32, decoder_heads=2)
        imgs, noise = torch.randn(8, 3, 64, 64, device=CUDA), torch.rand(8, 4, device=CUDA)
        return model.to(CUDA), lambda m: m(imgs, 0.5, noise)["loss"]
    if name == "finetune":
        model = ViT(num_classes=10, global_pool="avg", **TEACHER)
        labels = torch.randint(0, 10, (8,), device=CUDA)
        return model.to(CUDA), lambda m: F.cross_entropy(m(imgs).float(), labels)
    student = mae_model.MAE(**STUDENT, recon_layer=2 if name == "d2mae" else None)
    if name == "mae":
        return student.to(CUDA), lambda m: m(imgs, 0.75, noise)["loss"]
    teacher = ViT(**TEACHER).requires_grad_(False).eval()
    kw = dict(target="relation", teacher_input="full") if name == "relation" else {}
    model = distill.DistilledMAE(student, teacher, [4], [4], **kw)
    return model.to(CUDA), lambda m: m(imgs, 0.75, noise)["loss"]


def one_step(name, precision, compiled):
    """The loss of one forward pass, then a backward and a fused AdamW step; returns (loss,
    whether every trained parameter moved and stayed finite)."""
    model, loss_of = objective(name)
    run = torch.compile(model) if compiled else model
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        loss = loss_of(run)
    loss.backward()
    optimizer.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, params)]
    healthy = all(torch.isfinite(p).all() for p in params) and sum(moved) > 0.9 * len(params)
    return loss.item(), healthy


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_objective_in_bf16_and_compiled_matches_fp32(name):
    reference, healthy = one_step(name, "fp32", compiled=False)
    assert healthy
    compiled, healthy = one_step(name, "fp32", compiled=True)
    assert healthy and compiled == pytest.approx(reference, rel=COMPILED_FP32_RTOL)
    for use_compile in (False, True):
        loss, healthy = one_step(name, "bf16", compiled=use_compile)
        assert healthy and loss == pytest.approx(reference, rel=BF16_RTOL), (use_compile, loss)


def test_cuda_graphs_step_trains_as_eager_over_several_steps():
    """bench.py's step under torch.compile(mode="reduce-overhead") (CUDA graphs, replayed into
    the same memory) against the same step eager: after 4 steps of AdamW on fixed inputs and a
    fixed mask, the same weights (fp32, compiled reorders sums only)."""
    import bench

    def train(mode):
        model, loss_of = objective("mae")
        step = bench.make_step(model, lambda m, x: loss_of(m), True, None, "fp32",
                               mode is not None, CUDA, mode)
        for _ in range(4):
            step()
        torch.cuda.synchronize()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    eager, graphs = train(None), train("reduce-overhead")
    assert torch.isfinite(graphs).all()
    torch.testing.assert_close(graphs, eager, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
@pytest.mark.parametrize("rel_pos", [False, True])
def test_sdpa_kernels_match_the_explicit_attention_in_bf16(backend, rel_pos):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if rel_pos and backend == "FLASH_ATTENTION":
        pytest.skip("flash attention takes no additive mask (SDPA then picks another kernel)")
    torch.manual_seed(0)
    attn = Attention(192, 12, rel_pos_grid=(14, 14) if rel_pos else None).to(CUDA)
    if rel_pos:
        torch.nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    x = torch.randn(16, 1 + 14 * 14, 192, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explicit, _ = attn(x, return_logits=True)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            fast, _ = attn(x)
    exact, _ = attn(x, return_logits=True)  # fp32
    # both bf16 paths sit within bf16's rounding of the fp32 result, and of each other
    for out in (explicit, fast):
        torch.testing.assert_close(out.float(), exact, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast.float(), explicit.float(), atol=2e-2, rtol=2e-2)


def test_device_loader_on_cuda_gives_the_cpu_crops_and_skips_a_truncated_jpeg(tmp_path, capsys):
    import bench_data

    root = tmp_path / "imgs"
    bench_data.write_jpegs(str(root / "train"), 12)
    whole = (root / "train" / "class0" / "0.jpg").read_bytes()
    (root / "train" / "class0" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    batches = {}
    for device in (torch.device("cpu"), CUDA):
        loader = device_loader.DeviceLoader(str(root), 13, seed=0, device=device, img_size=32,
                                            num_workers=0, interpolation="random")
        torch.manual_seed(0)  # the crops come from the global RNG, as in the training loop
        bad = data.BadImages()
        batches[device.type] = [imgs for imgs, _ in loader.epoch(0, bad)]
        batches[device.type + "_skipped"] = bad.skipped
    cpu, cuda = batches["cpu"], batches["cuda"]
    assert len(cpu) == len(cuda) == 1 and cuda[0].device.type == "cuda"
    # the truncated file is skipped with a warning on both devices (nvJPEG alone would decode
    # it into grey rows: device_loader.is_whole_jpeg keeps it away), and the run goes on
    assert batches["cpu_skipped"] == batches["cuda_skipped"] == 1
    assert cpu[0].shape == cuda[0].shape == (12, 3, 32, 32)
    assert torch.isfinite(cuda[0]).all()
    # nvJPEG and libjpeg's IDCTs differ by a grey level or two, never by a different crop
    diff = (cuda[0].cpu() - cpu[0]).abs()
    assert diff.mean() < 0.03 and diff.amax() < 0.5, (diff.mean(), diff.amax())


def test_dali_loader_on_cuda_crops_as_on_the_cpu_and_skips_a_truncated_jpeg(tmp_path, capsys):
    import augment
    from test_dali import crop_geometry, write_gradients

    write_gradients(tmp_path, 64)
    whole = (tmp_path / "train" / "a" / "0.jpg").read_bytes()
    (tmp_path / "train" / "a" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    samples = data.image_files("imagefolder", str(tmp_path), "train").samples
    crops, skipped = {}, {}
    for device in (torch.device("cpu"), CUDA):
        loader = dali_loader.DaliLoader(
            samples, 65, 0, device, dali_loader.mae_graph(32, 0.2, "random"),
            augment.pretrain_transform(32, 0.2, "random"), (3, 32, 32), num_workers=2)
        bad = data.BadImages()
        crops[device.type] = torch.cat([x for e in range(4) for x, _ in loader.epoch(e, bad)])
        skipped[device.type] = bad.skipped
    cpu, cuda = crops["cpu"], crops["cuda"]
    # nvJPEG would decode the truncated file into grey rows; is_whole_jpeg keeps it away
    assert skipped == {"cpu": 4, "cuda": 4} and cuda.shape == cpu.shape == (256, 3, 32, 32)
    assert cuda.device.type == "cuda" and torch.isfinite(cuda).all()
    area_c, _, flip_c = crop_geometry(cpu)
    area_g, _, flip_g = crop_geometry(cuda.cpu())
    assert abs(area_c.mean() - area_g.mean()) < 4 * (area_c.var() / 256 + area_g.var() / 256).sqrt()
    assert abs(flip_g.float().mean() - 0.5) < 0.12
    # MoCo's two views and fine-tuning's jitter + erasing run on the GPU too (GPU arithmetic
    # with coins and masks drawn on the CPU)
    for graph, fallback, shape in (
            (dali_loader.moco_graph(32, 0.08), augment.MocoViews(32, 0.08), (2, 3, 32, 32)),
            (dali_loader.finetune_graph(32, 0.08, 0.4, 0.5), None, (3, 32, 32))):
        whole_files = [s for s in samples if "truncated" not in s[0]]
        loader = dali_loader.DaliLoader(whole_files, 16, 0, CUDA, graph, fallback, shape)
        images = torch.cat([x for x, _ in loader.epoch(0)])
        assert images.shape == (64, *shape) and images.is_cuda and images.isfinite().all()


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_script(args, torchrun=False):
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "1"] if torchrun else [])
    result = subprocess.run(launcher + args, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


MAE_RUN = ["mae.py", "--img-size", "32", "--patch-size", "4", "--synthetic-size", "256",
           "--batch-size", "32", "--num-workers", "2", "--log-every", "1"]


@pytest.mark.parametrize("use_compile", ["off", "on"])
def test_resume_is_exact_on_cuda_in_deterministic_mode(tmp_path, use_compile):
    run = MAE_RUN + ["--epochs", "2", "--save-every", "1", "--precision", "bf16", "--compile",
                     use_compile, "--deterministic"]
    run_script(run + ["--out-dir", str(tmp_path / "straight")])
    out = run_script(run + ["--out-dir", str(tmp_path / "resumed"), "--resume",
                            str(tmp_path / "straight" / "checkpoint-1.pth")])
    assert "device cuda:0" in out
    straight = read_log(tmp_path / "straight" / "log.jsonl")
    resumed = read_log(tmp_path / "resumed" / "log.jsonl")
    assert [r["step"] for r in resumed] == [9, 10, 11, 12, 13, 14, 15, 16]
    assert [r["loss"] for r in straight[8:]] == [r["loss"] for r in resumed]


def test_fp16_with_loss_scaling_trains_and_saves_its_scale(tmp_path):
    run_script(MAE_RUN + ["--epochs", "2", "--precision", "fp16", "--out-dir", str(tmp_path)])
    log = read_log(tmp_path / "log.jsonl")
    assert len(log) == 16 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    scaler = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["scaler"]
    assert scaler["scale"] > 0


def test_one_process_torchrun_over_nccl(tmp_path):
    out = run_script(MAE_RUN + ["--epochs", "1", "--out-dir", str(tmp_path / "mae")],
                     torchrun=True)
    assert "1 process(es) (DDP over nccl)" in out and "compile True" in out
    assert len(read_log(tmp_path / "mae" / "log.jsonl")) == 8
    # MoCo-v3: SyncBatchNorm in the heads and the all-gathered keys, compiled
    out = run_script(["moco.py", "--img-size", "32", "--patch-size", "4", "--synthetic-size",
                      "128", "--batch-size", "32", "--mlp-dim", "64", "--out-dim", "32",
                      "--num-workers", "2", "--log-every", "1", "--epochs", "1",
                      "--out-dir", str(tmp_path / "moco")], torchrun=True)
    assert "1 process(es) (DDP over nccl)" in out
    log = read_log(tmp_path / "moco" / "log.jsonl")
    assert len(log) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # fine-tuning through the same path
    out = run_script(["finetune.py", "--init", str(tmp_path / "mae" / "checkpoint.pth"),
                      "--data", "synthetic", "--synthetic-size", "128", "--img-size", "32",
                      "--patch-size", "4", "--batch-size", "32", "--epochs", "1",
                      "--num-workers", "2", "--log-every", "1",
                      "--out-dir", str(tmp_path / "ft")], torchrun=True)
    assert "1 process(es) (DDP over nccl)" in out
