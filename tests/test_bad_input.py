"""Bad input, as a new user types it: every invocation below must stop with one line that names
the fix (argparse's `prog: error: ...` or our `error: ...`), a non-zero exit and no traceback.
The four scripts are driven in-process through main(argv)."""
import os
import shutil

import pytest
import torch
from PIL import Image

import analyze
import bench
import finetune
import mae
from presets import build_model
from model import ViT


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files a user might point the scripts at by mistake."""
    root = tmp_path_factory.mktemp("bad")
    paths = {"missing": str(root / "nope.pth"), "file": str(root / "a_file"),
             "text": str(root / "notes.pth"), "empty": str(root / "empty.pth"),
             "empty_dir": str(root / "empty_dir"), "nan_teacher": str(root / "nan.pth"),
             "wide": str(root / "wide.pth"), "truncated": str(root / "truncated.pth"),
             "huge_teacher": str(root / "huge.pth"), "finetuned": str(root / "finetuned.pth"),
             "pretrained": str(root / "pretrained.pth"), "all_bad": str(root / "all_bad"),
             "split_classes": str(root / "split_classes"), "empty_log": str(root / "log.jsonl"),
             "deit": str(root / "deit.pth")}
    (root / "a_file").write_text("x")
    (root / "notes.pth").write_text("my notes\n")
    (root / "empty.pth").write_bytes(b"")
    (root / "empty_dir").mkdir()
    teacher = build_model("vit_tiny", img_size=32, patch_size=4)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    state["blocks.3.attn.qkv.weight"][0, 0] = float("nan")
    torch.save({"model": state}, paths["nan_teacher"])
    torch.save({"model": ViT(img_size=32, patch_size=4, embed_dim=48, depth=12,
                             num_heads=12).state_dict()}, paths["wide"])
    good = root / "good.pth"
    torch.save({"model": teacher.state_dict()}, good)
    (root / "truncated.pth").write_bytes(good.read_bytes()[:5000])
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    state["blocks.0.attn.qkv.weight"] *= 1e20  # finite, but float32 overflows on the way
    torch.save({"model": state}, paths["huge_teacher"])
    torch.save({"model": teacher.state_dict(), "args": {"recipe": "impr"}}, paths["finetuned"])
    torch.save({"model": teacher.state_dict(), "args": {"mask_ratio": 0.75}}, paths["pretrained"])
    torch.save({"model": teacher.state_dict(), "args": {"model": "deit_tiny"}}, paths["deit"])
    for split in ("train", "val"):  # JPEG names, garbage inside
        for i in range(8):
            (root / "all_bad" / split / "a").mkdir(parents=True, exist_ok=True)
            (root / "all_bad" / split / "a" / f"{i}.jpg").write_bytes(b"not a jpeg")
    for split, classes in (("train", "abc"), ("val", "ab")):
        for c in classes:
            (root / "split_classes" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (60 * i, 20, 99)).save(
                    root / "split_classes" / split / c / f"{i}.png")
    (root / "log.jsonl").write_text("")
    # Fashion-MNIST folders with one file broken each (the slice's IDX files otherwise)
    fmnist = os.path.join(os.path.dirname(__file__), "data", "fashion-mnist-slice")
    images, labels = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
    for name, broken in (("fm_truncated", {images: open(os.path.join(fmnist, images), "rb")
                                           .read()[:20000]}),
                         ("fm_not_gzip", {images: b"not gzip at all"}),
                         ("fm_other_set", {labels: open(os.path.join(fmnist, "t10k-labels-idx1-"
                                                                     "ubyte.gz"), "rb").read()})):
        shutil.copytree(fmnist, root / name)
        for file, content in broken.items():
            (root / name / file).write_bytes(content)
        paths[name] = str(root / name)
    (root / "only_val" / "val" / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(root / "only_val" / "val" / "a" / "0.png")
    paths["only_val"] = str(root / "only_val")
    paths["hiera"] = str(root / "hiera.pth")
    torch.save({"model": build_model("hiera_tiny_lite", img_size=64).state_dict()},
               paths["hiera"])
    (root / "export" / "model.safetensors").parent.mkdir()
    (root / "export" / "model.safetensors").write_bytes(b"an earlier export")
    paths["export"] = str(root / "export")
    return paths


CASES = [
    # mae.py: flags out of range (the fuzz found tracebacks or silent acceptance for several)
    (mae, ["--patch-size", "0"], "--patch-size 0 must be at least 1"),
    (mae, ["--img-size", "0"], "--img-size 0 must be at least 1"),
    (mae, ["--blr", "-1"], "--blr -1.0 must be greater than 0"),
    (mae, ["--lr", "nan"], "--lr nan must be greater than 0"),
    (mae, ["--min-lr", "inf"], "--min-lr inf"),
    (mae, ["--num-workers", "-1"], "--num-workers -1 must be at least 0"),
    (mae, ["--weight-decay", "-0.1"], "--weight-decay"),
    (mae, ["--clip-grad", "-1"], "--clip-grad"),
    (mae, ["--mask-ratio", "1"], "--mask-ratio 1.0 must be in [0, 1)"),
    (mae, ["--mask-ratio", "-0.1"], "--mask-ratio"),
    (mae, ["--epochs", "0"], "--epochs 0 must be at least 1"),
    (mae, ["--epochs", "2", "--warmup-epochs", "5"], "--warmup-epochs 5 must be within 0..--epochs"),
    (mae, ["--decoder-dim", "50"], "divisible by --decoder-heads"),
    (mae, ["--recon-layer", "13"], "beyond vit_tiny's 12 blocks"),
    (mae, ["--student-drop-path", "1"], "--student-drop-path 1.0 must be in [0, 1)"),
    (mae, ["--max-images", "0"], "--max-images 0 must be at least 1"),
    (mae, ["--distill-layer", "3", "--model", "hiera_tiny_lite"], "needs --teacher for a Hiera"),
    (mae, ["--distill-layer", "12", "--data", "imagefolder", "--data-root", "{empty_dir}",
           "--img-size", "32", "--patch-size", "4"], "use --img-size 224 --patch-size 16"),
    (mae, ["--teacher", "mae_vit_bse"], "the names are mae_vit_base, mae_vit_large"),
    (mae, ["--teacher", "mae_vit_large", "--teacher-model", "vit_base"], "is a vit_large"),
    (mae, ["--img-size", "30"], "not a multiple of --patch-size"),
    (mae, ["--batch-size", "abc"], "invalid int value"),
    (mae, ["--model", "vit_huge"], "invalid choice"),
    (mae, ["--data", "imagefolder"], "needs --data-root"),
    (mae, ["--data", "imagefolder", "--data-root", "{missing}"], "is not a folder"),
    (mae, ["--data", "imagefolder", "--data-root", "{empty_dir}"], "no images found"),
    (mae, ["--out-dir", "{file}"], "is a file: give a folder"),
    (mae, ["--init", "{missing}"], "does not exist"),
    (mae, ["--init", "{text}"], "damaged or not a PyTorch checkpoint"),
    (mae, ["--init", "{empty}"], "damaged or not a PyTorch checkpoint"),
    (mae, ["--init", "{truncated}"], "damaged or not a PyTorch checkpoint"),
    (mae, ["--init", "{wide}"], "another width"),
    (mae, ["--init", "{text}", "--resume", "{text}"], "give one of them"),
    (mae, ["--resume", "{text}"], "cannot read"),
    (mae, ["--resume", "{missing}"], "does not exist"),
    (mae, ["--teacher", "{missing}"], "does not exist"),
    (mae, ["--teacher", "{nan_teacher}", "--teacher-model", "vit_tiny"], "NaN or inf"),
    # ... and what a second fuzz found
    (mae, ["--teacher", "{huge_teacher}", "--teacher-model", "vit_tiny"], "NaN or inf features"),
    (mae, ["--teacher", "{nan_teacher}"], "i.e. --teacher-model vit_tiny"),
    (mae, ["--seed", "99999999999999999999"], "--seed 99999999999999999999 must be in"),
    (mae, ["--mask-ratio", "0"], "nothing to reconstruct"),
    (mae, ["--resume", "{finetuned}"], "is a finetune.py checkpoint"),
    (mae, ["--lr", "1e-4", "--min-lr", "1"], "above the peak lr"),
    (mae, ["--data", "imagefolder", "--data-root", "{all_bad}", "--img-size", "32", "--patch-size", "4", "--batch-size", "4"], "made no step"),
    # ... and a third (2026-12-03)
    (mae, ["--data", "fashion_mnist", "--data-root", "{fm_truncated}"],
     "is not a whole Fashion-MNIST IDX file: reinstall"),
    (mae, ["--data", "fashion_mnist", "--data-root", "{fm_not_gzip}"],
     "is not a whole Fashion-MNIST IDX file: reinstall"),
    (mae, ["--data", "imagefolder", "--data-root", "{only_val}"], "has val/ but no train/"),
    (mae, ["--recon-layer", "-1"], "--recon-layer -1 is not a block of vit_tiny's 12 blocks"),
    (mae, ["--out-dir", "/proc/nanomim_cannot_be_here"], "cannot be created or written"),
    (mae, ["--init", "{hiera}", "--model", "vit_tiny", "--img-size", "64", "--patch-size", "4"],
     "i.e. --model hiera_tiny_lite"),
    (mae, ["--model", "hiera_tiny_lite", "--img-size", "32"], "a larger --img-size"),
    (mae, ["--distill-on", "probs"], "shape distillation, and this run has no teacher"),
    (mae, ["--distill-weight", "5", "--teacher-input", "full"], "--teacher-input full shape"),
    (mae, ["--teacher", "{nan_teacher}", "--teacher-model", "vit_tiny", "--distill-target",
           "rep", "--distill-on", "probs"], "--distill-on probs compares attention maps"),
    (mae, ["--distill-layer", "6,6"], "names a block twice"),
    (mae, ["--teacher", "mae_vit_base", "--img-size", "32", "--patch-size", "4"],
     "sees 224-px images in 16-px patches: give the student --img-size 224"),  # no download
    (mae, ["--teacher", "{hiera}", "--img-size", "64", "--patch-size", "4", "--batch-size", "2",
           "--synthetic-size", "4"], "i.e. --teacher-model hiera_tiny_lite"),
    # finetune.py
    (finetune, ["--data", "fashion_mnist", "--data-root", "{fm_other_set}"],
     "the files are of different sets"),
    (finetune, ["--init", "{finetuned}", "--export", "{export}"],
     "holds an earlier export (model.safetensors)"),
    (finetune, ["--init", "{finetuned}", "--eval", "--keep-blocks", "2", "--img-size", "32",
                "--patch-size", "4"], "as it was fine-tuned: drop --keep-blocks 2"),
    (finetune, ["--init", "{finetuned}", "--eval", "--recipe", "linprobe", "--img-size", "32",
                "--patch-size", "4"], "drop --recipe linprobe"),
    (finetune, ["--recipe", "linprobe", "--batch-size", "1"], "at least 2 images a batch"),
    (finetune, ["--recipe", "linprobe", "--init", "{pretrained}", "--keep-blocks", "2"],
     "freezes the pre-trained backbone"),
    (finetune, ["--recipe", "linprobe", "--layer-decay", "0.5"], "has no effect"),
    (finetune, ["--mixup", "-1"], "--mixup -1.0 must be at least 0"),
    (finetune, ["--drop-path", "2"], "--drop-path 2.0 must be in [0, 1)"),
    (finetune, ["--smoothing", "1.5"], "--smoothing 1.5 must be in [0, 1)"),
    (finetune, ["--reprob", "2"], "--reprob 2.0 must be in [0, 1]"),
    (finetune, ["--max-images", "0"], "--max-images 0 must be at least 1"),
    (finetune, ["--blr", "-1"], "--blr -1.0 must be greater than 0"),
    (finetune, ["--lr", "nan"], "--lr nan must be greater than 0"),
    (finetune, ["--lr", "0.01,-1"], "--lr -1.0"),
    (finetune, ["--layer-decay", "0"], "--layer-decay 0.0 must be in (0, 1]"),
    (finetune, ["--rand-aug", "11"], "--rand-aug 11.0 must be in [0, 10]"),
    (finetune, ["--labels-per-class", "0"], "--labels-per-class 0 must be at least 1"),
    (finetune, ["--num-workers", "-1"], "--num-workers -1 must be at least 0"),
    (finetune, ["--eval"], "need --init"),
    (finetune, ["--init", "mae_vit_bse"], "the names are mae_vit_base, mae_vit_large"),
    (finetune, ["--init", "{missing}", "--eval"], "does not exist"),
    (finetune, ["--init", "{text}", "--eval"], "damaged or not a PyTorch checkpoint"),
    (finetune, ["--init", "{wide}"], "another width"),
    (finetune, ["--init", "{wide}", "--keep-blocks", "13"], "--keep-blocks 13 must be within"),
    (finetune, ["--out-dir", "{file}"], "is a file: give a folder"),
    (finetune, ["--resume", "{text}"], "cannot read"),
    (finetune, ["--resume", "{pretrained}"], "is a mae.py checkpoint"),
    (finetune, ["--subset-seed", "-1"], "--subset-seed -1 must be in"),
    (finetune, ["--init", "{pretrained}", "--eval", "--img-size", "32", "--patch-size", "4"],
     "no classifier head"),
    (finetune, ["--init", "{text}", "--export", "vit_tiny_timm.pth"], "names a file"),
    (finetune, ["--data", "imagefolder", "--data-root", "{split_classes}", "--img-size", "32", "--patch-size", "4", "--batch-size", "4"],
     "hold different classes"),
    (finetune, ["--data", "imagefolder", "--data-root", "{all_bad}", "--img-size", "32", "--patch-size", "4", "--batch-size", "4"], "made no step"),
    # bench.py
    (bench, ["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (bench, ["--steps", "0"], "--steps 0 must be at least 1"),
    (bench, ["--small-batch", "0"], "--small-batch 0 must be at least 1"),
    (bench, ["--img-size", "30", "--patch-size", "8"], "not a multiple of --patch-size"),
    (bench, ["--benches", "nope"], "unknown bench"),
    (bench, ["--benches", ","], "names no bench"),
    (bench, ["--compile-mode", "reduce-overhead", "--compile", "off"], "needs compiled rows"),
    (bench, ["--out", "{empty_dir}"], "is a folder"),
    (bench, ["--out", "/proc/nanomim_cannot_be_here/b.json"], "cannot be created or written"),
    (bench, ["--small-data-root", "{missing}"], "--small-data-root: Fashion-MNIST file"),
    # analyze.py
    (analyze, ["cka", "--a", "{missing}"], "does not exist"),
    (analyze, ["cka", "--a", "{text}"], "damaged or not a PyTorch checkpoint"),
    (analyze, ["attn", "--ckpt", "{wide}", "--img-size", "32", "--patch-size", "4"],
     "another width"),
    (analyze, ["cka", "--a", "{missing}", "--num-images", "2"], "--num-images"),
    (analyze, ["cka", "--a", "{deit}", "--img-size", "32", "--patch-size", "4"],
     "use --model-a deit_tiny"),
    (analyze, ["cka", "--a", "{text}", "--patch-size", "0"], "--patch-size 0 must be at least 1"),
    (analyze, ["cka", "--a", "{text}", "--batch-size", "3"], "--batch-size 3 must be at least 4"),
    (analyze, ["cka", "--a", "{text}", "--names", "x", "y", "z"], "--names"),
    (analyze, ["cka", "--a", "{text}", "--data", "bogus"], "invalid choice"),
    (analyze, ["cka", "--a", "{text}", "--random-init", "vit_tiny", "--b", "{text}"],
     "not both"),
    (analyze, ["cka", "--a", "{text}", "--model-b", "vit_tiny"], "give --b too"),
    (analyze, ["recon", "--ckpt", "{text}", "--img-size", "-16"], "--img-size -16"),
    (analyze, ["attnmap", "--ckpt", "{text}", "--block", "0"], "--block 0 must be at least 1"),
    (analyze, ["recon", "--ckpt", "{pretrained}"], "has no decoder"),
    (analyze, ["curves", "{empty_log}"], "holds no records"),
    (analyze, ["curves", "{empty_log}", "--out", "c.txt"], "must name a .png"),
    (analyze, ["curves", "{empty_log}", "--out", ".png"], "must name a .png"),
    (analyze, ["probe", "--ckpt", "{text}", "--random-init", "vit_tiny"],
     "not --ckpt and --random-init"),
    (analyze, ["probe", "--pixels", "--subset-seeds", "1", "1"], "repeats a seed"),
    (analyze, ["probe", "--pixels", "--num-images", "16"], "probe scores --max-images"),
    (analyze, ["curves", "{empty_log}", "{empty_log}"], "a log is given twice"),
]


@pytest.mark.parametrize("script, argv, expected", CASES,
                         ids=[f"{s.__name__}:{' '.join(a)}" for s, a, _ in CASES])
def test_bad_input_stops_with_one_line_naming_the_fix(script, argv, expected, files, tmp_path,
                                                      capsys):
    argv = [a.format(**files) for a in argv]
    if script in (mae, finetune) and "--out-dir" not in argv:
        argv += ["--out-dir", str(tmp_path / "out")]
    if script in (mae, finetune):
        argv += ["--num-workers", "0"] if "--num-workers" not in argv else []
    if script is analyze:
        argv += ["--out", str(tmp_path / "c.png")] if argv[0] == "curves" and "--out" not in \
            argv else [] if argv[0] == "curves" else ["--out-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stopped:
        script.main(argv)
    out = capsys.readouterr()
    assert stopped.value.code not in (0, None)
    message = stopped.value.code if isinstance(stopped.value.code, str) else \
        out.err.strip().splitlines()[-1]
    assert "Traceback" not in out.out + out.err
    assert "\n" not in message and "error" in message
    assert expected in message, message


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and {s for s, _, _ in CASES} == {mae, finetune, bench, analyze}


@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT is not set: launch with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
    ({"RANK": "1"}, "RANK=1 of WORLD_SIZE=1: launch with torchrun"),
], ids=["world-size-alone", "no-port", "rank-alone"])
def test_a_distributed_environment_without_torchrun_is_one_line(env, expected, monkeypatch,
                                                                tmp_path, capsys):
    """torch.distributed would raise deep inside (or wait forever) on a half-set environment."""
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stopped:
        mae.main(["--out-dir", str(tmp_path / "out"), "--num-workers", "0", "--epochs", "1",
                  "--synthetic-size", "16", "--img-size", "16", "--batch-size", "8"])
    assert expected in str(stopped.value.code) and "\n" not in str(stopped.value.code)
    assert "Traceback" not in capsys.readouterr().err
