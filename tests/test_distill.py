"""Distillation: head/representation maps, frozen teacher, same visible tokens, D^2-MAE layout,
relation loss against its formula, teacher loading, and mae.py end to end."""
import copy
import json
import math

import pytest
import torch

import distill
import mae
import mae_model
from checkpoints import CheckpointError, load_pretrained
from model import ViT
from test_model import fair_encoder_state_dict

STUDENT = dict(embed_dim=64, depth=3, num_heads=4, img_size=32, patch_size=4, decoder_dim=32,
               decoder_depth=1, decoder_heads=2)
TEACHER = dict(embed_dim=96, depth=3, num_heads=6, img_size=32, patch_size=4)


def make(student_kw=None, teacher=None, layers=(3,), teacher_layers=(3,), **kw):
    torch.manual_seed(0)
    student = mae_model.MAE(**{**STUDENT, **(student_kw or {})})
    teacher = teacher if teacher is not None else ViT(**TEACHER)
    teacher.requires_grad_(False).eval()
    return distill.DistilledMAE(student, teacher, list(layers), list(teacher_layers), **kw)


def twin_teacher(student):
    """A teacher identical to the student's encoder."""
    teacher = ViT(**{k: v for k, v in STUDENT.items() if not k.startswith("decoder")})
    teacher.load_state_dict(mae_model.encoder_state_dict(student))
    return teacher.requires_grad_(False).eval()


def test_head_map_trains_teacher_frozen_student_moves():
    module = make()
    head_map = module.head_maps["3"]
    assert head_map.shape == (6, 4)  # (teacher_heads, student_heads)
    teacher_before = copy.deepcopy(module.teacher.state_dict())
    student_before = copy.deepcopy(module.student.state_dict())
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    out = module(torch.randn(2, 3, 32, 32), 0.75)
    loss, recon, dist = out["loss"], out["recon_loss"], out["distill_loss"]
    loss.backward()
    assert head_map.grad is not None and head_map.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teacher.parameters())
    opt.step()
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    assert not torch.equal(module.student.blocks[2].attn.qkv.weight,
                           student_before["blocks.2.attn.qkv.weight"])
    assert torch.isclose(loss, recon + dist)


@pytest.mark.parametrize("target", ["attn", "rep", "relation"])
def test_identical_teacher_and_identity_map_give_zero_loss(target):
    torch.manual_seed(0)
    student = mae_model.MAE(**STUDENT)
    module = distill.DistilledMAE(student, twin_teacher(student), [3], [3], target=target)
    with torch.no_grad():
        if target == "attn":
            module.head_maps["3"].copy_(torch.eye(4))
        if target == "rep":
            module.rep_maps["3"].copy_(torch.eye(64))
    dist = module(torch.randn(2, 3, 32, 32), 0.75)["distill_loss"]
    assert dist.item() < 1e-6


def test_teacher_sees_the_students_visible_tokens_in_order():
    module = make()
    seen = {}
    run_blocks = module.teacher.run_blocks

    def spy(x, *args, **kwargs):
        seen["x"] = x
        return run_blocks(x, *args, **kwargs)

    module.teacher.run_blocks = spy
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    module(imgs, 0.75, noise)
    _, _, _, ids_keep = mae_model.random_masking(torch.zeros(2, 64, 1), 0.75, noise)
    tokens = module.teacher.embed(imgs)
    expected = module.teacher.prepend_cls(
        torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, 96)))
    torch.testing.assert_close(seen["x"], expected)


def test_full_teacher_input_picks_the_visible_tokens():
    # mask ratio 0 shuffles every token; an identical teacher on the unshuffled image, with its
    # features picked in the student's order, must agree exactly (TinyMIM layout, no recon).
    torch.manual_seed(0)
    student = mae_model.MAE(**STUDENT, recon_layer=0)
    module = distill.DistilledMAE(student, twin_teacher(student), [3], [3], target="relation",
                                  teacher_input="full")
    out = module(torch.randn(2, 3, 32, 32), 0.0)
    recon, dist = out["recon_loss"], out["distill_loss"]
    assert recon.item() == 0 and dist.item() < 1e-6  # summation-order rounding only
    assert not module.student.decoder_pred.weight.requires_grad  # decoder unused, not trained


def test_d2mae_layout():
    module = make(student_kw={"recon_layer": 2})
    assert isinstance(module.extra_blocks["3"], distill.AttentionOnly)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    latent, _, _, _, blocks, _ = module.student.forward_encoder(imgs, 0.75, noise,
                                                                return_blocks={3})
    torch.testing.assert_close(latent, module.student.norm(blocks[2]))  # decoder reads block 2
    loss = module(imgs, 0.75, noise)["loss"]
    loss.backward()
    # block 3 (after the reconstruction layer) is trained through the extra block
    assert module.student.blocks[2].mlp.fc2.weight.grad.abs().sum() > 0
    backbone = mae_model.encoder_state_dict(module.student)
    assert not any("extra" in k or "head_map" in k for k in backbone)
    ViT(**{k: v for k, v in STUDENT.items() if not k.startswith("decoder")}).load_state_dict(
        backbone, strict=True)


def test_relation_loss_matches_the_formula():
    torch.manual_seed(0)
    q_s, k_s, v_s, q_t, k_t, v_t = (torch.randn(1, 1, 3, 2) for _ in range(6))
    loss = distill.relation_distill_loss((q_s, k_s, v_s), (q_t, k_t, v_t))

    def softmax_rows(a, b):
        rows = []
        for i in range(3):
            scores = [sum(a[0, 0, i, c] * b[0, 0, j, c] for c in range(2)) / math.sqrt(2)
                      for j in range(3)]
            z = sum(math.exp(s) for s in scores)
            rows.append([math.exp(s) / z for s in scores])
        return rows

    def kl(p_t, p_s):  # summed over keys, averaged over queries
        return sum(sum(t * math.log(t / s) for t, s in zip(rt, rs))
                   for rt, rs in zip(p_t, p_s)) / 3

    expected = (kl(softmax_rows(q_t, k_t), softmax_rows(q_s, k_s))
                + kl(softmax_rows(v_t, v_t), softmax_rows(v_s, v_s)))
    assert abs(loss.item() - expected) < 1e-5
    extreme = distill.relation_distill_loss((q_s * 1e4, k_s * 1e4, v_s * 1e4), (q_t, k_t, v_t))
    assert torch.isfinite(extreme)


def test_attention_loss_is_mse_of_mapped_logits():
    s, t, m = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5), torch.randn(6, 4)
    mapped = torch.stack([sum(m[i, j] * s[:, j] for j in range(4)) for i in range(6)], dim=1)
    expected = ((mapped - t) ** 2).mean()
    torch.testing.assert_close(distill.attention_distill_loss(s, t, m), expected)


@pytest.mark.parametrize("prefix", ["", "module.model."])
def test_teacher_files_load(tmp_path, prefix):
    sd = fair_encoder_state_dict(width=192, depth=12, grid=4)
    path = tmp_path / "teacher.pth"
    torch.save({"model": {prefix + k: v for k, v in sd.items()}}, path)
    teacher = distill.load_teacher(str(path), "vit_tiny", img_size=16, patch_size=4)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher.blocks[11].attn.qkv.weight, sd["blocks.11.attn.qkv.weight"])


def test_wrong_or_incomplete_teacher_is_refused(tmp_path):
    path = tmp_path / "narrow.pth"
    torch.save({"model": fair_encoder_state_dict(width=64, depth=12, grid=4)}, path)
    with pytest.raises(CheckpointError, match="another width"):
        distill.load_teacher(str(path), "vit_tiny", img_size=16, patch_size=4)
    sd = fair_encoder_state_dict(width=192, depth=12, grid=4)
    del sd["norm.weight"], sd["norm.bias"]
    torch.save(sd, path)
    with pytest.raises(distill.DistillError, match="norm.weight"):
        distill.load_teacher(str(path), "vit_tiny", img_size=16, patch_size=4)


def test_layout_validation():
    with pytest.raises(distill.DistillError, match="beyond the student"):
        make(layers=(4,))
    with pytest.raises(distill.DistillError, match="beyond the teacher"):
        make(teacher_layers=(5,))
    with pytest.raises(distill.DistillError, match="no gradient"):
        make(student_kw={"recon_layer": 1}, layers=(2,), teacher_layers=(2,))


RUN = ["--img-size", "16", "--patch-size", "4", "--synthetic-size", "32", "--batch-size", "8",
       "--num-workers", "0", "--log-every", "1", "--teacher-model", "vit_tiny"]


def read_log(path):
    """The step lines of a run's log.jsonl (the kNN monitor's epoch lines, which have no loss,
    left out)."""
    with open(path) as f:
        return [row for row in map(json.loads, f) if "loss" in row]


def test_d2mae_through_mae_py_trains_and_resumes(tmp_path):
    teacher_path = tmp_path / "teacher.pth"
    torch.manual_seed(1)
    torch.save({"model": ViT(img_size=16, patch_size=4, embed_dim=192, depth=12,
                             num_heads=12).state_dict()}, teacher_path)
    run = RUN + ["--teacher", str(teacher_path), "--distill-layer", "12", "--recon-layer", "8",
                 "--epochs", "3", "--warmup-epochs", "0", "--lr", "1e-3", "--save-every", "1"]
    mae.main(run + ["--out-dir", str(tmp_path / "a")])
    log = read_log(tmp_path / "a" / "log.jsonl")
    assert all("recon_loss" in r and "distill_loss" in r for r in log)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    assert any("extra" in k for k in ckpt["distill"]) and "head_maps.12" in ckpt["distill"]
    backbone = ViT(img_size=16, patch_size=4, embed_dim=192, depth=12, num_heads=12)
    report = load_pretrained(backbone, str(tmp_path / "a" / "checkpoint.pth"), verbose=False)
    assert report["initialised"] == []
    mae.main(run + ["--out-dir", str(tmp_path / "b"),
                    "--resume", str(tmp_path / "a" / "checkpoint-2.pth")])
    resumed = read_log(tmp_path / "b" / "log.jsonl")
    for a, b in zip(log[8:], resumed):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-6


@pytest.mark.parametrize("flags, message", [
    (["--distill-layer", "12", "--model", "hiera_tiny_lite"], "needs --teacher for a Hiera"),
    (["--distill-layer", "12", "--data", "fashion_mnist", "--img-size", "32", "--patch-size", "4"],
     "sees 224-px images in 16-px patches, this run 32-px images in 4-px patches"),
    (["--no-recon"], "without --teacher"),
    (["--teacher", "t.pth", "--distill-layer", "x"], "block numbers separated by commas"),
])
def test_bad_distill_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mae.main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_layer_against_models_is_one_line(tmp_path):
    teacher_path = tmp_path / "teacher.pth"
    torch.save({"model": ViT(img_size=16, patch_size=4, embed_dim=192, depth=12,
                             num_heads=12).state_dict()}, teacher_path)
    with pytest.raises(SystemExit) as exit_info:
        mae.main(RUN + ["--teacher", str(teacher_path), "--distill-layer", "13", "--out-dir",
                        str(tmp_path / "o")])
    assert "--distill-layer 13 is beyond the student's 12 blocks" in str(exit_info.value.code)


DEMO = ["--img-size", "16", "--patch-size", "4", "--synthetic-size", "16", "--batch-size", "8",
        "--num-workers", "0", "--log-every", "1"]


def test_the_design_card_command_trains_a_demo_teacher_once(tmp_path, capsys):
    """`mae.py --distill-layer 12 --recon-layer 8` on the synthetic demo: a vit_small MAE
    teacher is pre-trained beside --out-dir first, then reused; an interrupted one continues."""
    teacher = tmp_path / "demo_teacher" / "checkpoint.pth"
    with pytest.raises(SystemExit) as stopped:  # a wrong block is named before any training
        mae.main(DEMO + ["--distill-layer", "13", "--out-dir", str(tmp_path / "a")])
    assert "--distill-layer 13 is beyond" in str(stopped.value.code) and not teacher.exists()
    # an interrupted teacher: 1 of 2 epochs done
    mae.main(DEMO + ["--model", "vit_small", "--epochs", "1", "--out-dir", str(teacher.parent)])
    ckpt = torch.load(teacher, weights_only=True)
    ckpt["args"]["epochs"] = 2
    torch.save(ckpt, teacher)
    capsys.readouterr()
    mae.main(DEMO + ["--distill-layer", "12", "--recon-layer", "8", "--epochs", "1",
                     "--out-dir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert out.startswith("--distill-layer without --teacher") and "vit_small" in out.split("\n")[0]
    assert "pre-training the demo teacher first" in out
    assert torch.load(teacher, weights_only=True)["epoch"] == 1  # it continued to its end
    log = [r for r in read_log(tmp_path / "a" / "log.jsonl") if "loss" in r]  # the step records
    assert log and all("recon_loss" in r and "distill_loss" in r for r in log)
    args = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)["args"]
    assert (args["teacher"], args["teacher_model"]) == (str(teacher), "vit_small")
    written = teacher.stat().st_mtime_ns
    mae.main(DEMO + ["--distill-layer", "12", "--recon-layer", "8", "--epochs", "1",
                     "--out-dir", str(tmp_path / "b")])
    assert "reused" in capsys.readouterr().out and teacher.stat().st_mtime_ns == written
    with pytest.raises(SystemExit) as stopped:  # a teacher of other patches is not reused
        mae.main(DEMO[4:] + ["--img-size", "32", "--patch-size", "8", "--distill-layer", "12",
                             "--out-dir", str(tmp_path / "c")])
    assert "saw 16-px images in 4-px patches, this run 32-px images in 8-px patches" in \
        str(stopped.value.code)


def test_a_teacher_of_other_patches_or_images_is_one_line(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save({"model": fair_encoder_state_dict(width=192, depth=12, grid=4)}, path)
    with pytest.raises(distill.DistillError, match="sees 16-px images in 4-px patches but the "
                                                   "student 32-px images in 8-px patches"):
        distill.load_teacher(str(path), "vit_tiny", img_size=32, patch_size=8)
    with pytest.raises(distill.DistillError, match="sees 16-px images in 4-px patches but the "
                                                   "student 32-px images in 4-px patches: give "
                                                   "the student --img-size 16 --patch-size 4"):
        distill.load_teacher(str(path), "vit_tiny", img_size=32, patch_size=4)
