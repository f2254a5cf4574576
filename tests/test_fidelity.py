"""Fidelity to the papers' published code (MAE-Lite, TinyMIM, FAIR MAE, Hiera): one test or more
per difference README's Fidelity table lists, each failing on nanoMIM's earlier behaviour; the
last section adds tests of behaviour that was right but untested."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import augment
import checkpoints
import classifier
import device_loader
import distill
import finetune
import loop
import mae
import mae_model
import plumbing
import presets
import teachers
from checkpoints import CheckpointError, load_pretrained
from model import ViT, attention_logits
from test_distill import STUDENT, TEACHER, make
from test_model import fair_encoder_state_dict


def pretrain_args(*flags):
    return mae.parse_args(list(flags))


def finetune_args(*flags):
    return finetune.parse_args(list(flags))


# ----------------------------------------------------------------------------------------------
# 1. RandAugment: timm's rand-m10-mstd0.5-inc1


def test_randaugment_op_set_is_timms_increasing_set():
    assert len(augment.RAND_OPS) == 15
    assert "Identity" not in augment.RAND_OPS
    assert {"Invert", "SolarizeAdd", "PosterizeIncreasing"} <= set(augment.RAND_OPS)
    timm_aa = pytest.importorskip("timm.data.auto_augment")
    assert list(augment.RAND_OPS) == list(timm_aa._RAND_INCREASING_TRANSFORMS)


def test_randaugment_draws_ops_with_replacement_each_with_prob_half_and_own_level(monkeypatch):
    calls = []

    def record(img, name, level, sign=1.0, **kw):
        calls[-1].append((name, level, sign))
        return img

    monkeypatch.setattr(augment, "rand_op", record)
    torch.manual_seed(0)
    aug = augment.RandAugment(magnitude=10, std=0.5)
    img = Image.new("RGB", (8, 8))
    images = 4000
    for _ in range(images):
        calls.append([])
        aug(img)
    applied = [c for image in calls for c in image]
    # each of the 2 ops applied with probability 0.5: about 1 op per image, not ~1.9
    assert abs(len(applied) / images - 1.0) < 0.05
    assert abs(sum(len(c) == 2 for c in calls) / images - 0.25) < 0.03
    # drawn uniformly with replacement: the same op twice in 1/15 of the two-op images
    twice = [c for c in calls if len(c) == 2]
    assert abs(sum(c[0][0] == c[1][0] for c in twice) / len(twice) - 1 / 15) < 0.025
    assert {name for name, _, _ in applied} == set(augment.RAND_OPS)
    # the level: N(10, 0.5) clipped to [0, 10], drawn per op (two ops of one image differ)
    levels = torch.tensor([level for _, level, _ in applied])
    assert levels.max() == 10 and levels.min() >= 0
    assert abs((levels == 10).float().mean() - 0.5) < 0.05
    assert abs(levels.mean() - (10 - 0.5 / math.sqrt(2 * math.pi))) < 0.03
    assert all(c[0][1] != c[1][1] for c in twice if c[0][1] < 10 and c[1][1] < 10)
    signs = torch.tensor([sign for _, _, sign in applied])
    assert abs(signs.mean()) < 0.06


def test_randaugment_ops_equal_timms_at_fixed_levels(monkeypatch):
    timm_aa = pytest.importorskip("timm.data.auto_augment")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (23, 31, 3), dtype=np.uint8))
    hparams = dict(img_mean=augment.MEAN_PIXEL, interpolation=Image.BICUBIC)
    for sign in (1.0, -1.0):
        monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v, s=sign: s * v)
        for name in augment.RAND_OPS:
            for level in (0.0, 3.7, 7.5, 9.9, 10.0):
                if name == "PosterizeIncreasing" and level == 10.0:
                    continue  # timm asks Pillow for 0 bits, which recent Pillow refuses
                theirs = timm_aa.AugmentOp(name, prob=1.0, magnitude=level, hparams=hparams)(img)
                ours = augment.rand_op(img, name, level, sign)
                assert np.array_equal(np.asarray(ours), np.asarray(theirs)), (name, level, sign)


def test_randaugment_strongest_posterize_is_black_as_with_the_papers_pillow():
    img = Image.new("RGB", (4, 4), (200, 100, 50))
    assert np.asarray(augment.rand_op(img, "PosterizeIncreasing", 10.0)).max() == 0


def test_fine_tuning_recipes_use_it():
    args = finetune_args("--recipe", "mae")
    steps = augment.train_transform(args).transforms
    aug = [s for s in steps if isinstance(s, augment.RandAugment)]
    assert len(aug) == 1 and (aug[0].magnitude, aug[0].std, aug[0].prob) == (9, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------
# 2. MAE-Lite's D^2-MAE files: 13 blocks, the 13th only norm1 + attn.qkv


def d2mae_release(depth=12, width=192):
    """A state dict in MAE-Lite's D^2-MAE layout: DDP + wrapper prefixes, the student with an
    extra attention-only block, the teacher and the head-mapping adapter beside it."""
    sd = fair_encoder_state_dict(width=width, depth=depth + 1, grid=4)
    sd = {k: v for k, v in sd.items() if not k.startswith(f"blocks.{depth}.")
          or k.startswith((f"blocks.{depth}.norm1.", f"blocks.{depth}.attn.qkv."))}
    state = {"module.model." + k: v for k, v in sd.items()}
    state["module.tch_model.cls_token"] = torch.zeros(1, 1, 768)
    state["module.attn_adapter.adapter11.weight"] = torch.zeros(12, 12, 1, 1)
    return {"model": state}, sd


def test_mae_lite_d2mae_checkpoint_loads_and_drops_the_extra_block(tmp_path, capsys):
    ckpt, sd = d2mae_release()
    path = tmp_path / "d2mae_tiny.pth"
    torch.save(ckpt, path)
    vit = ViT(img_size=16, patch_size=4)
    report = load_pretrained(vit, str(path))
    assert report["extra_block"] == sorted(k for k in sd if k.startswith("blocks.12."))
    assert set(report["extra_block"]) <= set(report["dropped"]) and not report["initialised"]
    assert "extra attention-only block" in capsys.readouterr().out
    torch.testing.assert_close(vit.blocks[11].attn.qkv.weight, sd["blocks.11.attn.qkv.weight"])
    # ... as a teacher and for the analyses, which load through the same function
    teacher = distill.load_teacher(str(path), "vit_tiny", img_size=16, patch_size=4)
    torch.testing.assert_close(teacher.norm.weight, sd["norm.weight"])
    assert checkpoints.load_model(str(path), "vit_tiny", 16, 4).depth == 12


def test_mae_lite_d2mae_checkpoint_transfers_with_clipping(tmp_path, monkeypatch):
    ckpt, _ = d2mae_release()
    path = tmp_path / "d2mae.pth"
    torch.save(ckpt, path)
    clips = []
    step = loop.optimizer_step
    monkeypatch.setattr(loop, "optimizer_step",
                        lambda opt, clip_grad=None, scaler=None:
                        clips.append(clip_grad) or step(opt, clip_grad, scaler))
    rows = finetune.main(["--init", str(path), "--recipe", "transfer", "--lr", "0.01",
                          "--img-size", "16", "--patch-size", "4", "--synthetic-size", "16",
                          "--max-images", "16", "--batch-size", "8", "--epochs", "1",
                          "--warmup-epochs", "0", "--num-workers", "0",
                          "--out-dir", str(tmp_path / "ft")])
    assert clips == [1.0, 1.0] and rows[0][1]["images"] == 4  # synthetic val: 16 / 4


def test_a_genuinely_deeper_file_is_refused_naming_the_model():
    for sd, expected in ((fair_encoder_state_dict(width=192, depth=24, grid=4),
                          "24 blocks of width 192, which no preset has"),
                         (fair_encoder_state_dict(width=1024, depth=24, grid=4),
                          "24 blocks of width 1024, i.e. --model vit_large")):
        with pytest.raises(CheckpointError, match=expected):
            load_pretrained(ViT(img_size=16, patch_size=4), sd, verbose=False)
    full_13th = fair_encoder_state_dict(width=192, depth=13, grid=4)  # a whole 13th block
    with pytest.raises(CheckpointError, match="deeper"):
        load_pretrained(ViT(img_size=16, patch_size=4), full_13th, verbose=False)


# ----------------------------------------------------------------------------------------------
# 3, 4, 8. Per-model pre-training defaults: mask ratio, crop, decoder


@pytest.mark.parametrize("model, mask, crop, decoder", [
    ("vit_tiny", 0.75, (0.08, "random"), (96, 1, 3)),
    ("vit_small", 0.75, (0.08, "random"), (192, 1, 6)),
    ("vit_base", 0.75, (0.2, "bicubic"), (512, 8, 16)),
    ("vit_large", 0.75, (0.2, "bicubic"), (512, 8, 16)),
    ("hiera_tiny_lite", 0.4, (0.08, "random"), (96, 1, 3)),
    ("hiera_base", 0.6, (0.2, "bicubic"), (512, 8, 16)),
])
def test_pretraining_defaults_per_model(model, mask, crop, decoder):
    args = pretrain_args("--model", model)
    assert args.mask_ratio == mask
    assert (args.min_crop_scale, args.crop_interpolation) == crop
    assert (args.decoder_dim, args.decoder_depth, args.decoder_heads) == decoder
    overridden = pretrain_args("--model", model, "--mask-ratio", "0.5", "--decoder-dim", "64",
                               "--decoder-heads", "4", "--min-crop-scale", "0.3")
    assert (overridden.mask_ratio, overridden.decoder_dim, overridden.min_crop_scale) == \
        (0.5, 64, 0.3)


def test_random_crop_interpolation_draws_bilinear_and_bicubic():
    # a left-right symmetric image: the flip changes nothing, the whole-image crop only resizes
    half = np.random.default_rng(0).integers(0, 256, (16, 8, 3), dtype=np.uint8)
    img = Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1))
    expected = {mode: augment.pretrain_transform(8, 1.0, mode)(img) for mode in ("bilinear", "bicubic")}
    assert not torch.equal(expected["bilinear"], expected["bicubic"])
    transform = augment.pretrain_transform(8, 1.0, "random")
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(img)
        seen |= {mode for mode, ref in expected.items() if torch.equal(out, ref)}
    assert seen == {"bilinear", "bicubic"}
    images = [torch.from_numpy(np.array(img)).permute(2, 0, 1)]
    on_device = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = device_loader.device_augment(images, 8, 1.0, "random")
        ref = {m: device_loader.device_augment(images, 8, 1.0, m) for m in ("bilinear", "bicubic")}
        on_device |= {m for m, r in ref.items() if torch.equal(out, r)}
    assert on_device == {"bilinear", "bicubic"}


# ----------------------------------------------------------------------------------------------
# 5. Transfer: Nesterov SGD, clipping at 1.0, min lr 1e-6, layer decay 0.75


def test_transfer_recipe_is_mae_lites():
    args = finetune_args("--recipe", "transfer")
    assert (args.opt, args.clip_grad, args.min_lr, args.layer_decay) == ("sgd", 1.0, 1e-6, 0.75)
    model = ViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    optimizer = classifier.build_optimizer(args, model, 0.1, torch.device("cpu"))
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)
    assert finetune_args().clip_grad is None  # impr: no clipping
    assert pretrain_args("--clip-grad", "3").clip_grad == 3.0


def test_optimizer_step_clips_the_gradient_norm():
    w = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.tensor([30.0, 40.0])  # norm 50
    loop.optimizer_step(optimizer, clip_grad=1.0)
    torch.testing.assert_close(w.data, torch.tensor([-0.6, -0.8]))
    assert w.grad is None
    w.grad = torch.tensor([30.0, 40.0])
    loop.optimizer_step(optimizer, clip_grad=None)
    torch.testing.assert_close(w.data, torch.tensor([-30.6, -40.8]))


# ----------------------------------------------------------------------------------------------
# 6, 7. Distilled layers are summed; the extra block gets MAE's init


def test_several_distilled_layers_are_summed():
    module = make(layers=(2, 3), teacher_layers=(2, 3))
    student, teacher = module.student, module.teacher
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    total = module(imgs, 0.75, noise)["distill_loss"]
    kept, _, _, ids_keep = mae_model.random_masking(student.embed(imgs), 0.75, noise)  # (B, K, D)
    _, _, s_logits = student.run_blocks(student.prepend_cls(kept), 3, (), (2, 3))
    t_tokens = teacher.embed(imgs)
    t_kept = torch.gather(t_tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, t_tokens.shape[2]))
    _, _, t_logits = teacher.run_blocks(teacher.prepend_cls(t_kept), 3, (), (2, 3))
    per_layer = [distill.attention_distill_loss(s_logits[layer], t_logits[layer],
                                                module.head_maps[str(layer)])
                 for layer in (2, 3)]
    torch.testing.assert_close(total, per_layer[0] + per_layer[1])


def test_extra_block_has_maes_init():
    torch.manual_seed(0)
    block = distill.AttentionOnly(192)
    assert torch.equal(block.qkv.bias, torch.zeros(3 * 192))
    # xavier-uniform bound sqrt(6 / (192 + 576)); PyTorch's default stays within 1 / sqrt(192)
    assert block.qkv.weight.abs().max() > 1 / math.sqrt(192)
    assert block.qkv.weight.abs().max() <= math.sqrt(6 / (192 + 576))


# ----------------------------------------------------------------------------------------------
# 9. Weight decay: pre-training decays the tokens, fine-tuning exempts them


def test_weight_decay_exemptions():
    model = mae_model.MAE(**STUDENT)
    decayed = {id(p) for g in loop.param_groups(model, 0.05) if g["weight_decay"] > 0
               for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert {"cls_token", "mask_token", "blocks.0.attn.qkv.weight"} <= names
    assert not any(n.endswith(("bias", "norm1.weight")) for n in names)
    vit = ViT(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=3)
    vit.pos_embed.requires_grad_(True)
    groups = classifier.build_optimizer(finetune_args(), vit, 1e-3, torch.device("cpu")).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in vit.named_parameters() if id(p) in decayed}
    assert "cls_token" not in names and "pos_embed" not in names and "head.weight" in names
    hiera = presets.build_mae("hiera_tiny_lite", img_size=64)  # MAE-Lite decays Hiera's too
    decayed = {id(p) for g in loop.param_groups(hiera, 0.05) if g["weight_decay"] > 0
               for p in g["params"]}
    assert {"pos_embed", "mask_token", "decoder_pos_embed"} <= \
        {n for n, p in hiera.named_parameters() if id(p) in decayed}


# ----------------------------------------------------------------------------------------------
# 10, 11. Teacher blocks by target; TinyMIM's recipe


def test_default_teacher_blocks_are_the_papers():
    def teacher_blocks(*flags):
        return teachers.distill_layers(pretrain_args("--teacher", "t.pth", *flags))[1]

    assert teacher_blocks("--teacher-model", "vit_large") == [12]
    assert teacher_blocks("--teacher-model", "vit_large", "--distill-target", "relation",
                          "--no-recon") == [18]
    assert teacher_blocks("--distill-target", "relation", "--no-recon") == [12]
    assert teacher_blocks("--model", "hiera_tiny_lite") == [24]
    assert distill.default_teacher_layer(24, 24, 24, "relation") == 24  # not TinyMIM's pairing


def test_tinymim_student_drop_path_spares_the_last_block():
    args = pretrain_args("--student-drop-path", "0.1", "--img-size", "16")
    _, student = mae.build_training_module(args, torch.device("cpu"))
    assert [b.drop_path_rate for b in student.blocks] == [0.1] * 11 + [0.0]


def test_tinymim_colour_jitter_is_on_the_students_view_only():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    torch.manual_seed(3)
    pair = augment.pretrain_transform(8, 0.2, "bicubic", student_color_jitter=0.4)(img)
    torch.manual_seed(3)
    plain = augment.pretrain_transform(8, 0.2, "bicubic")(img)
    assert pair.shape == (2, 3, 8, 8)
    assert torch.equal(pair[0], plain)  # the teacher's view: same crop and flip, no jitter
    assert not torch.equal(pair[1], pair[0])


def test_two_views_reach_teacher_and_student():
    module = make()
    seen = {}
    features = module.teacher_features

    def spy(imgs, ids_keep):
        seen["teacher"] = imgs
        return features(imgs, ids_keep)

    module.teacher_features = spy
    views = torch.randn(2, 2, 3, 32, 32)
    module(views[:, 1], 0.75, teacher_imgs=views[:, 0])
    assert torch.equal(seen["teacher"], views[:, 0])


def test_tinymim_command_runs(tmp_path):
    teacher_path = tmp_path / "teacher.pth"
    torch.save({"model": ViT(img_size=16, patch_size=4, embed_dim=192, depth=12,
                             num_heads=12).state_dict()}, teacher_path)
    mae.main(["--img-size", "16", "--patch-size", "4", "--synthetic-size", "16",
              "--batch-size", "8", "--num-workers", "0", "--epochs", "1", "--teacher-model",
              "vit_tiny", "--teacher", str(teacher_path), "--distill-target", "relation",
              "--teacher-input", "full", "--mask-ratio", "0", "--no-recon", "--blr", "1e-3",
              "--student-drop-path", "0.1", "--student-color-jitter", "0.4",
              "--min-crop-scale", "0.2", "--crop-interpolation", "bicubic",
              "--out-dir", str(tmp_path / "o")])
    assert (tmp_path / "o" / "checkpoint.pth").exists()


# ----------------------------------------------------------------------------------------------
# 12. Attention distance in the papers' units


def test_attention_distance_units():
    probs = torch.zeros(1, 1, 2, 2)  # a 1 x 2 grid, each token attends to the other one
    probs[0, 0, 0, 1] = probs[0, 0, 1, 0] = 1
    assert analyze.attention_distance(probs, (1, 2), 16).item() == 16  # pixels
    assert analyze.attention_distance(probs, (1, 2), 16, unit="paper").item() == 14
    assert analyze.attention_distance(probs, (1, 2), 8, unit="paper").item() == 14


# ----------------------------------------------------------------------------------------------
# 13. Initialisation of the head and of from-scratch models


def prepared(*flags):
    args = finetune_args(*flags)
    torch.manual_seed(0)
    return classifier.prepare_model(args, 10, torch.device("cpu"))


def test_head_init_follows_the_recipe():
    # --fresh-init mae: the head's init comes from the recipe alone (MAE's init is xavier)
    assert abs(prepared("--fresh-init", "mae").head.weight.std() - 0.02) < 0.003  # impr: 0.02
    assert prepared("--recipe", "mae").head.weight.std() < 1e-4  # FAIR: 2e-5
    assert abs(prepared("--recipe", "linprobe").head[1].weight.std() - 0.01) < 0.002
    hiera = prepared("--model", "hiera_tiny_lite")  # Hiera keeps its own: 0.02 x 0.001
    assert hiera.head.projection.weight.std() < 1e-4 and hiera.head.projection.bias.max() > 0
    assert abs(prepared("--model", "hiera_tiny_lite", "--head-init-std", "0.02")
               .head.projection.weight.std() - 0.02) < 0.003


def test_from_scratch_vit_gets_timms_init():
    model = prepared()
    assert abs(model.blocks[0].attn.qkv.weight.std() - 0.02) < 0.002  # xavier would be 0.051
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(3 * 192))
    assert abs(model.pos_embed.std() - 0.02) < 0.002  # learned and random, not sin-cos
    mae_init = prepared("--fresh-init", "mae")
    assert abs(mae_init.blocks[0].attn.qkv.weight.std() - math.sqrt(2 / (192 + 576))) < 0.003


# ----------------------------------------------------------------------------------------------
# 14. Tests the comparison found missing


def test_d2mae_extra_block_logits_by_hand():
    torch.manual_seed(0)
    block = distill.AttentionOnly(8)
    x = torch.randn(1, 3, 8)  # (B, N, D): one image, 3 tokens
    q, k, _ = distill.split_heads(block(x), heads=2)  # (1, 2, 3, 4) each
    logits = attention_logits(q, k)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    normed = (x - mu) / torch.sqrt(var + 1e-6) * block.norm1.weight + block.norm1.bias
    qkv = normed[0] @ block.qkv.weight.T + block.qkv.bias  # (3, 24): [q | k | v], heads inside
    for h in range(2):
        for i in range(3):
            for j in range(3):
                qi, kj = qkv[i, 4 * h:4 * h + 4], qkv[j, 8 + 4 * h:8 + 4 * h + 4]
                expected = sum(qi[c] * kj[c] for c in range(4)) / 2  # sqrt(head width 4)
                assert abs(logits[0, h, i, j].item() - expected.item()) < 1e-5


def test_representation_loss_with_a_non_identity_map():
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    n = torch.randn(4, 5)  # N maps the student's 4 channels to the teacher's 5
    expected = sum((sum(s[b, i, c] * n[c, d] for c in range(4)) - t[b, i, d]) ** 2
                   for b in range(2) for i in range(3) for d in range(5)) / 30
    torch.testing.assert_close(distill.representation_distill_loss(s, t, n), expected)


def test_relations_between_models_of_different_head_widths():
    torch.manual_seed(0)
    student = mae_model.MAE(**{**STUDENT, "recon_layer": 0})  # 64 wide: 6 teacher heads do not divide
    with pytest.raises(distill.DistillError, match="divide evenly"):
        distill.DistilledMAE(student, ViT(**TEACHER), [3], [3], target="relation")
    teacher = ViT(**{**TEACHER, "embed_dim": 128, "num_heads": 8})  # heads of width 16 vs 8
    module = distill.DistilledMAE(student, teacher, [3], [3], target="relation",
                                  teacher_input="full")
    imgs = torch.randn(2, 3, 32, 32)
    loss = module(imgs, 0.0)["distill_loss"]
    _, s_out, _ = student.forward_features(imgs, depth=3, return_blocks=(2,))
    _, t_out, _ = teacher.forward_features(imgs, depth=3, return_blocks=(2,))
    s_block, t_block = student.blocks[2], teacher.blocks[2]
    s_qkv = distill.split_heads(s_block.attn.qkv(s_block.norm1(s_out[2])), 8)  # 8 heads of 8
    t_qkv = distill.split_heads(t_block.attn.qkv(t_block.norm1(t_out[2])), 8)  # 8 heads of 16
    assert s_qkv[0].shape[-1] == 8 and t_qkv[0].shape[-1] == 16
    torch.testing.assert_close(loss, distill.relation_distill_loss(s_qkv, t_qkv))


def test_distill_on_probabilities():
    s, t, m = torch.randn(1, 2, 3, 3), torch.randn(1, 3, 3, 3), torch.randn(3, 2)
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    mapped = torch.einsum("ts,bsij->btij", m, p_s)
    expected = ((mapped - p_t) ** 2).mean()
    torch.testing.assert_close(distill.attention_distill_loss(s, t, m, on="probs"), expected)
    assert not torch.allclose(distill.attention_distill_loss(s, t, m), expected)
    module = make(distill_on="probs")
    loss = module(torch.randn(2, 3, 32, 32), 0.75)["distill_loss"]
    assert 0 < loss.item() < 1  # probabilities: bounded differences


# ----------------------------------------------------------------------------------------------
# Runs written before these defaults resume as they were trained


def test_a_checkpoint_from_before_the_fidelity_defaults_resumes(tmp_path, capsys):
    flags = ["--img-size", "16", "--synthetic-size", "16", "--batch-size", "8",
             "--num-workers", "0", "--warmup-epochs", "0"]
    mae.main(flags + ["--epochs", "1", "--out-dir", str(tmp_path / "a")])
    path = tmp_path / "a" / "checkpoint.pth"
    ckpt = torch.load(path, weights_only=True)
    # rewrite it as the earlier code did: FAIR's crop recorded, no crop interpolation, no
    # clipping flag, tokens in the no-decay group of the optimizer
    del ckpt["no_decay_names"]
    for name in ("crop_interpolation", "clip_grad", "student_drop_path", "student_color_jitter"):
        del ckpt["args"][name]
    ckpt["args"]["min_crop_scale"] = 0.2
    args = pretrain_args(*flags)
    module, _ = mae.build_training_module(args, torch.device("cpu"))
    module.load_state_dict(ckpt["model"])
    old = torch.optim.AdamW(loop.param_groups(module, 0.05,
                                              no_decay_names=plumbing.LEGACY_NO_DECAY))
    module(torch.randn(2, 3, 16, 16), 0.75)["loss"].backward()
    old.step()  # an optimizer state in the earlier grouping (tokens not decayed)
    ckpt["optimizer"] = old.state_dict()
    torch.save(ckpt, path)
    capsys.readouterr()
    mae.main(flags + ["--epochs", "2", "--resume", str(path), "--out-dir", str(tmp_path / "b")])
    assert "flags not given take the values of the run" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert resumed["args"]["crop_interpolation"] == "bicubic"
    assert resumed["args"]["min_crop_scale"] == 0.2 and resumed["epoch"] == 1
    assert resumed["no_decay_names"] == list(plumbing.LEGACY_NO_DECAY)


@pytest.mark.parametrize("script, flags, message", [
    (finetune, ["--clip-grad", "-1"], "--clip-grad -1.0 must be at least 0"),
    (mae, ["--clip-grad", "-1"], "--clip-grad -1.0 must be at least 0"),
    (mae, ["--student-color-jitter", "0.4"], "it needs --teacher"),
])
def test_bad_fidelity_flags(script, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
