"""MAE: masking, patch order, loss, overfitting, recon layer, the training loop end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

import augment
import data
import mae
import mae_model
from checkpoints import load_pretrained
from model import ViT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=64, depth=3, num_heads=4, img_size=32, patch_size=4, decoder_dim=32,
            decoder_depth=1, decoder_heads=2)
# A short real run of mae.py: vit_tiny at 16 px with patch 4, 32 synthetic images, batch 8.
RUN = ["--img-size", "16", "--patch-size", "4", "--synthetic-size", "32", "--batch-size", "8",
       "--num-workers", "0", "--log-every", "1"]


def test_random_masking_invariants():
    torch.manual_seed(0)
    B, L, D, ratio = 3, 20, 5, 0.75
    x = torch.randn(B, L, D)
    kept, mask, ids_restore, ids_keep = mae_model.random_masking(x, ratio)
    K = int(L * (1 - ratio))
    assert kept.shape == (B, K, D) and mask.shape == (B, L)
    assert torch.all(mask.sum(1) == L - K)
    for b in range(B):
        torch.testing.assert_close(kept[b], x[b, ids_keep[b]])  # kept tokens are x at ids_keep
        assert torch.all(mask[b, ids_keep[b]] == 0)
    # ids_restore un-shuffles: putting [kept, removed] back in order gives x itself
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, D))
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    torch.testing.assert_close(restored, x)
    assert torch.equal(ids_shuffle[:, :K], ids_keep)


def test_patchify_order_and_round_trip():
    imgs = torch.randn(2, 3, 8, 12)
    x = mae_model.patchify(imgs, 4)
    assert x.shape == (2, 6, 48)
    # patch 4 is row 1, column 1; element (p=1, q=2, c=0) sits at index (1*4 + 2)*3 + 0
    assert x[0, 4, (1 * 4 + 2) * 3 + 0] == imgs[0, 0, 4 + 1, 4 + 2]
    assert x[1, 4, (3 * 4 + 0) * 3 + 2] == imgs[1, 2, 4 + 3, 4 + 0]
    torch.testing.assert_close(mae_model.unpatchify(x, 4, (2, 3)), imgs)


def test_loss_counts_only_removed_patches():
    torch.manual_seed(0)
    model = mae_model.MAE(**TINY, norm_pix_loss=False)
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 64, 48)
    mask = torch.zeros(2, 64)
    mask[:, :10] = 1
    loss = model.forward_loss(imgs, pred, mask)
    target = mae_model.patchify(imgs, 4)
    expected = ((pred[:, :10] - target[:, :10]) ** 2).mean()  # by hand: removed patches only
    torch.testing.assert_close(loss, expected)
    pred2 = pred.clone()
    pred2[:, 10:] += 100  # changing visible-patch predictions changes nothing
    torch.testing.assert_close(model.forward_loss(imgs, pred2, mask), loss)


def test_norm_pix_target():
    model = mae_model.MAE(**TINY)
    imgs = torch.randn(1, 3, 32, 32)
    target = mae_model.patchify(imgs, 4)[0, 5]
    normed = (target - target.mean()) / (target.var(unbiased=True) + 1e-6).sqrt()
    mask = torch.zeros(1, 64)
    mask[0, 5] = 1
    pred = torch.zeros(1, 64, 48)
    pred[0, 5] = normed
    assert model.forward_loss(imgs, pred, mask).item() < 1e-10


def test_decoder_reads_recon_layer_and_deeper_blocks_are_not_run():
    torch.manual_seed(0)
    model = mae_model.MAE(**TINY, recon_layer=2)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    latent, mask, ids_restore, ids_keep, _, _ = model.forward_encoder(imgs, 0.75, noise)
    x = model.prepend_cls(mae_model.random_masking(model.embed(imgs), 0.75, noise)[0])
    expected = model.norm(model.run_blocks(x, depth=2)[0])
    torch.testing.assert_close(latent, expected)
    loss = model(imgs, 0.75, noise)["loss"]
    loss.backward()
    assert model.blocks[1].mlp.fc2.weight.grad is not None
    assert model.blocks[2].mlp.fc2.weight.grad is None  # block 3 never ran


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = mae_model.MAE(**TINY)
    ds = data.build_dataset("synthetic", transform=augment.eval_transform(32), img_size=32)
    imgs = torch.stack([ds[i][0] for i in range(8)])
    noise = torch.rand(8, 64)  # the same mask every step: one batch, memorised
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = model(imgs, 0.75, noise)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def read_log(path):
    """The step lines of a run's log.jsonl (the kNN monitor's epoch lines, which have no loss,
    left out)."""
    with open(path) as f:
        return [row for row in map(json.loads, f) if "loss" in row]


def test_end_to_end_outputs_and_exported_encoder(tmp_path):
    out = tmp_path / "run"
    mae.main(RUN + ["--epochs", "2", "--out-dir", str(out)])
    assert {"checkpoint.pth", "checkpoint-2.pth", "log.jsonl", "reconstruction.png",
            "curves.png"} <= set(os.listdir(out))
    log = read_log(out / "log.jsonl")
    assert len(log) == 8 and all(r["skipped_images"] == 0 for r in log)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)  # a plain dict
    assert ckpt["epoch"] == 1 and ckpt["step"] == 8 and ckpt["args"]["model"] == "vit_tiny"
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    from PIL import Image
    png = Image.open(out / "reconstruction.png")
    assert png.size[1] == 3 * 96  # three rows of 16 px images enlarged 6x
    backbone = ViT(img_size=16, patch_size=4, embed_dim=192, depth=12, num_heads=12)
    report = load_pretrained(backbone, str(out / "checkpoint.pth"), verbose=False)
    assert report["initialised"] == [] and "decoder_pred.weight" in report["dropped"]


def test_resume_is_exact(tmp_path):
    # 2 epochs of 4 steps straight through, against 1 epoch + resume; workers exercise seeding.
    run = RUN + ["--num-workers", "1", "--epochs", "2", "--save-every", "1"]
    mae.main(run + ["--out-dir", str(tmp_path / "straight")])
    mae.main(run + ["--out-dir", str(tmp_path / "resumed"),
                    "--resume", str(tmp_path / "straight" / "checkpoint-1.pth")])
    straight = read_log(tmp_path / "straight" / "log.jsonl")
    resumed = read_log(tmp_path / "resumed" / "log.jsonl")
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for a, b in zip(straight[4:], resumed):
        assert a["step"] == b["step"] and a["lr"] == b["lr"]
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    mae.main(RUN + ["--epochs", "1", "--precision", "bf16", "--out-dir", str(tmp_path)])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(tmp_path / "log.jsonl"))


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "mae.py", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("flags, message", [
    (["--recon-layer", "14"], "--recon-layer 14 is beyond vit_tiny's 12 blocks (choose 1..12)"),
    (["--img-size", "30", "--patch-size", "4"], "not a multiple of --patch-size"),
    (["--mask-ratio", "1.0"], "--mask-ratio"),
    (["--decoder-dim", "30"], "--decoder-dim 30"),
    (["--data", "imagefolder"], "needs --data-root"),
    (["--data", "imagefolder", "--data-root", "/no/such/folder"], "is not a folder"),
    (["--warmup-epochs", "50", "--epochs", "10"], "--warmup-epochs 50"),
])
def test_bad_flags_exit_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mae.main(flags)  # argparse's error(): usage and one message line, exit status 2
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_data_and_diverged_loss_are_one_line_errors(tmp_path):
    os.makedirs(tmp_path / "empty" / "train")
    result = run_cli("--data", "imagefolder", "--data-root", str(tmp_path / "empty"),
                     "--out-dir", str(tmp_path / "o1"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no images found")
    result = run_cli(*RUN, "--epochs", "1", "--lr", "1e30", "--out-dir", str(tmp_path / "o2"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "training diverged" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("content, words", [(b"garbage", "damaged"), (None, "not a nanoMIM")])
def test_resume_from_a_wrong_file_is_refused(tmp_path, capsys, content, words):
    path = tmp_path / "bad.pth"
    if content is None:
        torch.save({"model": {"cls_token": torch.zeros(1, 1, 192)}}, path)  # weights, not a run
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        mae.main(RUN + ["--epochs", "1", "--resume", str(path), "--out-dir", str(tmp_path / "o")])
    assert words in str(exit_info.value.code)


def test_compiled_step_matches_eager():
    import plumbing
    torch.manual_seed(0)
    model = mae_model.MAE(embed_dim=32, depth=2, num_heads=2, img_size=16, patch_size=4, decoder_dim=16,
                          decoder_depth=1, decoder_heads=2)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    eager = model(imgs, 0.75, noise)["loss"]
    eager.backward()
    eager_grad = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    loss = plumbing.maybe_compile(model, True)(imgs, 0.75, noise)["loss"]
    loss.backward()
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad, eager_grad, atol=1e-5,
                               rtol=1e-4)
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


@pytest.mark.parametrize("flags", [[], ["--recon-layer", "8"]])  # all blocks used / not
def test_ddp_under_torchrun_on_cpu(tmp_path, flags):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "mae.py", *RUN, "--synthetic-size", "64", "--epochs", "1", "--out-dir", str(tmp_path),
         *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stdout and "batch 16" in result.stdout
    log = read_log(tmp_path / "log.jsonl")  # rank 0 alone writes the log: 64 / 16 = 4 steps
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert os.path.exists(tmp_path / "checkpoint.pth")


@pytest.mark.parametrize("loader", ["device", "dali"])
def test_file_loader_run_and_exact_resume(tmp_path, loader):
    from test_data import write_image_folder
    write_image_folder(tmp_path / "imgs" / "train", per_class=8, corrupt=1)
    run = ["--img-size", "16", "--patch-size", "4", "--batch-size", "4", "--log-every", "1",
           "--data", "imagefolder", "--data-root", str(tmp_path / "imgs"), "--loader", loader,
           "--num-workers", "1", "--epochs", "2", "--save-every", "1", "--warmup-epochs", "1"]
    mae.main(run + ["--out-dir", str(tmp_path / "straight")])
    mae.main(run + ["--out-dir", str(tmp_path / "resumed"),
                    "--resume", str(tmp_path / "straight" / "checkpoint-1.pth")])
    straight = read_log(tmp_path / "straight" / "log.jsonl")
    resumed = read_log(tmp_path / "resumed" / "log.jsonl")
    assert len(straight) == 8 and straight[-1]["skipped_images"] == 2  # 1 bad file per epoch
    assert [r["step"] for r in straight[4:]] == [r["step"] for r in resumed]
    for a, b in zip(straight[4:], resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6


def test_bench_smoke_on_cpu(tmp_path, fmnist_slice):
    """bench.py in a tiny configuration: every step, both loaders and the Fashion-MNIST epoch
    run; no timing asserted."""
    import bench
    rows, loaders, small = bench.main(["--img-size", "32", "--patch-size", "8", "--batch-size",
                                       "2", "--steps", "1", "--warmup", "1", "--repeats", "1",
                                       "--jpegs", "14", "--workers", "0", "--loader-batch", "4",
                                       "--small-images", "40", "--small-batch", "8",
                                       "--small-data-root", fmnist_slice,
                                       "--out", str(tmp_path / "bench.json")])
    assert small[0]["steps"] == 5 and small[0]["epoch_s"] > 0 and small[0]["val_images"] == 40
    names = {r["bench"] for r in rows}
    assert {"mae", "mae_distill", "finetune", "infer"} <= names
    assert all(r["images_per_s"] > 0 and r["gflop_per_image"] > 0 for r in rows)
    assert {r["loader"] for r in loaders} == {"pil", "device", "device_batched", "dali"}
    assert all(r["images"] == 12 for r in loaders)  # three full batches of 4 of the 14 JPEGs
    # the steady rate leaves out the first batch (no workers: the fill is one batch)
    assert all(r["fill_batches"] == 1 and r["steady_images_per_s"] > 0 for r in loaders)
    stages = loaders[0]["ms_per_image_one_thread"]
    assert len(stages) == 8 and all(ms > 0 for ms in stages.values())  # dali's stage included
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["steps"]) == len(rows)


def test_one_process_under_torchrun_still_uses_ddp(monkeypatch):
    # `torchrun --nproc_per_node 1` runs the multi-GPU code path (DDP, all-gathers): it is how
    # the NCCL path is tested on one GPU (tests/test_cuda.py); gloo here
    import socket

    import torch.distributed as dist

    import plumbing
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(TORCHELASTIC_RUN_ID="t", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(plumbing, "default_device", lambda: torch.device("cpu"))  # GPU hosts too
    try:
        assert plumbing.setup_distributed() == (0, 1, torch.device("cpu"))
        assert dist.is_initialized()
        assert plumbing.processes_text(1) == "1 process(es) (DDP over gloo)"
    finally:
        plumbing.cleanup_distributed()
    assert plumbing.processes_text(1) == "1 process(es)"


def test_deterministic_flag_turns_deterministic_kernels_on(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")  # so that monkeypatch restores it
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        mae.main(RUN + ["--epochs", "1", "--deterministic", "--out-dir", str(tmp_path)])
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        # a resumed run keeps the flag unless told otherwise (--no-deterministic)
        args = mae.parse_args(["--resume", str(tmp_path / "checkpoint.pth")])
        assert args.deterministic
        args = mae.parse_args(["--resume", str(tmp_path / "checkpoint.pth"),
                               "--no-deterministic"])
        assert not args.deterministic
    finally:
        torch.use_deterministic_algorithms(before)


def test_bench_compile_mode_reaches_torch_compile_and_marks_each_step(monkeypatch):
    """--compile-mode is passed to torch.compile, and under CUDA graphs (reduce-overhead,
    max-autotune) each step tells the graph trees where it begins (the CUDA run is in
    tests/test_cuda.py); without it, nothing is marked."""
    import argparse

    import bench
    modes, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: modes.append(mode) or m)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    args = argparse.Namespace(img_size=32, patch_size=8, batch_size=2)
    images = torch.randn(2, 3, 32, 32)
    for mode, steps in (("reduce-overhead", 2), ("max-autotune", 1), (None, 2)):
        module, loss_fn, trains = bench.build_bench("mae", args, torch.device("cpu"))
        step = bench.make_step(module, loss_fn, trains, images, "fp32", True,
                               torch.device("cpu"), mode)
        for _ in range(steps):
            step()
    assert modes == ["reduce-overhead", "max-autotune", None] and len(marks) == 3
