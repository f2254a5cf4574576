"""CKA against its defining properties, attention metrics on constructed maps, the CLI."""
import json
import math

import pytest
import torch
from PIL import Image

import analyze
import probe
from model import ViT


def features(n=64, p=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g)
    Y = torch.tanh(X @ torch.randn(p, 12, generator=g)) + 0.3 * torch.randn(n, 12, generator=g)
    return X, Y


@pytest.mark.parametrize("unbiased", [True, False])
def test_cka_properties(unbiased):
    X, Y = features()
    cka = lambda a, b: analyze.linear_cka(a, b, unbiased)  # noqa: E731
    assert abs(cka(X, X) - 1) < 1e-9
    assert abs(cka(X, Y) - cka(Y, X)) < 1e-9
    Q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    assert abs(cka(X.double() @ Q, Y) - cka(X, Y)) < 1e-6  # orthogonal transform
    assert abs(cka(7.5 * X, Y) - cka(X, Y)) < 1e-9  # isotropic scaling
    A = torch.diag(torch.logspace(-2, 2, 20))  # a generic invertible (anisotropic) map
    assert abs(cka(X @ A, Y) - cka(X, Y)) > 0.05
    perm = torch.randperm(64)
    assert abs(cka(X[perm], Y[perm]) - cka(X, Y)) < 1e-9  # rows shuffled together


def test_unbiased_needs_four_examples():
    with pytest.raises(ValueError, match="at least 4"):
        analyze.linear_cka(torch.randn(3, 5), torch.randn(3, 5))


def test_hsic_of_a_matrix_with_itself_is_nonnegative():
    for seed in range(5):
        K = analyze.gram_linear(torch.randn(10, 3, generator=torch.Generator().manual_seed(seed)))
        assert analyze.hsic_unbiased(K, K) >= 0


def minibatch_cka(X, Y, batch, unbiased):
    cka = analyze.MinibatchCKA(1, 1, unbiased=unbiased)
    for i in range(0, len(X), batch):
        cka.update([X[i:i + batch]], [Y[i:i + batch]])
    return cka.compute()[0, 0].item()


def test_minibatch_estimate_is_unbiased():
    X, Y = features(n=1024, p=64)
    small, large = (minibatch_cka(X, Y, b, unbiased=True) for b in (16, 256))
    assert abs(small - large) < 0.02
    small_b, large_b = (minibatch_cka(X, Y, b, unbiased=False) for b in (16, 256))
    assert abs(small_b - large_b) > 3 * abs(small - large) and abs(small_b - large_b) > 0.03


def test_minibatch_drops_tiny_batches():
    X, Y = features(n=20)
    cka = analyze.MinibatchCKA(1, 1)
    cka.update([X[:16]], [Y[:16]])
    cka.update([X[16:19]], [Y[16:19]])
    assert cka.batches == 1 and cka.dropped == 1


def test_identity_attention_has_zero_distance_and_entropy():
    probs = torch.eye(16).expand(2, 3, 16, 16)
    assert torch.allclose(analyze.attention_distance(probs, (4, 4), 8), torch.zeros(3))
    assert torch.allclose(analyze.attention_entropy(probs), torch.zeros(3))


def test_uniform_attention_entropy_and_distance():
    k, patch = 4, 16
    probs = torch.full((1, 2, k * k, k * k), 1.0 / (k * k))
    assert torch.allclose(analyze.attention_entropy(probs), torch.full((2,), math.log(k * k)))
    total = 0.0  # brute force: mean distance between all ordered pairs of cells, in pixels
    for a in range(k * k):
        for b in range(k * k):
            total += math.dist(divmod(a, k), divmod(b, k)) * patch
    expected = total / (k * k) ** 2
    got = analyze.attention_distance(probs, (k, k), patch)
    assert torch.allclose(got, torch.full((2,), expected, dtype=got.dtype), atol=1e-9)


def test_model_against_itself_is_symmetric_with_unit_diagonal():
    torch.manual_seed(0)
    vit = ViT(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2).eval()
    imgs = torch.randn(24, 3, 16, 16)
    reps = probe.layer_representations(vit, imgs)
    assert len(reps) == 4 and reps[0].shape == (24, 16 * 32)  # cls removed, flattened
    cka = analyze.MinibatchCKA(4, 4)
    for i in range(0, 24, 8):
        batch = probe.layer_representations(vit, imgs[i:i + 8])
        cka.update(batch, batch)
    m = cka.compute()
    assert torch.allclose(m, m.T) and torch.allclose(torch.diagonal(m), torch.ones(4, dtype=m.dtype))


def test_attention_maps_drop_cls_and_renormalise():
    torch.manual_seed(0)
    vit = ViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2).eval()
    maps = analyze.attention_maps(vit, torch.randn(2, 3, 16, 16))
    assert set(maps) == {1, 2} and maps[1].shape == (2, 2, 16, 16)
    assert torch.allclose(maps[2].sum(-1), torch.ones(2, 2, 16))


def test_cli_writes_json_and_pngs(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": ViT(img_size=16, patch_size=4, embed_dim=192, depth=12,
                             num_heads=12).state_dict()}, ckpt)
    common = ["--img-size", "16", "--patch-size", "4", "--num-images", "32", "--batch-size", "16",
              "--out-dir", str(tmp_path)]
    analyze.main(["cka", "--a", str(ckpt), *common])
    result = json.loads((tmp_path / "cka.json").read_text())
    m = torch.tensor(result["matrix"])
    assert m.shape == (13, 13) and len(result["layers_a"]) == 13
    assert torch.allclose(torch.diagonal(m), torch.ones(13, dtype=m.dtype))
    analyze.main(["cka", "--a", str(ckpt), "--random-init", "vit_tiny", *common])
    analyze.main(["attn", "--ckpt", str(ckpt), "--labels", "mine", "--random-init", "vit_tiny",
                  *common])
    attn = json.loads((tmp_path / "attn.json").read_text())
    assert len(attn["mine"]["distance_px"]) == 12 and len(attn["mine"]["entropy_nats"][0]) == 12
    for name in ("cka.png", "attn_distance.png", "attn_entropy.png"):
        with Image.open(tmp_path / name) as img:
            img.verify()
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(["cka", "--a", str(tmp_path / "missing.pth"), *common])
    assert "does not exist" in str(exit_info.value.code)


def test_a_fine_tuned_file_with_relative_positions_is_analysed_with_them(tmp_path):
    """finetune.py --rel-pos files: the analyses build the model with the tables the file has
    (a model without them would refuse the file)."""
    import checkpoints
    from presets import build_model

    torch.manual_seed(0)
    tuned = build_model("vit_tiny", img_size=16, patch_size=4, rel_pos=True, num_classes=0)
    for name, p in tuned.named_parameters():
        if name.endswith("relative_position_bias_table"):
            p.data.normal_()
    path = tmp_path / "relpos.pth"
    torch.save({"model": tuned.state_dict()}, path)
    loaded = checkpoints.load_model(str(path), "vit_tiny", 16, 4)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.forward_features(x)[0], tuned.eval().forward_features(x)[0])
