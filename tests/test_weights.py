"""Published weights by name (weights.py): the download into the hub cache, its checks, and the
names in mae.py / finetune.py. The registry and the hub folder are monkeypatched: the "published"
file is a tiny checkpoint the test writes, served from a file:// URL, so no test reaches the
network."""
import hashlib
import io
import os
import urllib.error
import urllib.request

import pytest
import torch

import distill
import finetune
import mae
import weights
from checkpoints import CheckpointError, load_pretrained
from model import ViT


def tiny_vit(**kw):
    torch.manual_seed(0)
    return ViT(img_size=16, patch_size=4, embed_dim=192, depth=12, num_heads=12, **kw)


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A registry of one name, tiny_mae, whose file (a vit_tiny at 16 px, patch 4) is served
    from tmp/server; the hub cache is tmp/hub. Returns (entry, the served file, the cache)."""
    server = tmp_path / "server"
    server.mkdir()
    source = server / "tiny_mae.pth"
    torch.save({"model": tiny_vit().state_dict()}, source)
    entry = dict(model="vit_tiny", img_size=16, patch_size=4, url=source.as_uri(),
                 what="a tiny test MAE", source="this test", licence="none", size=None,
                 sha256=None)
    monkeypatch.setattr(weights, "WEIGHTS", {"tiny_mae": entry})
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return entry, source, tmp_path / "hub" / "checkpoints"


def cached_files(cache):
    return sorted(os.listdir(cache)) if cache.exists() else []


def test_a_name_downloads_once_into_the_hub_cache_then_is_a_path(published, capsys):
    entry, source, cache = published
    path = weights.resolve("tiny_mae", "--teacher")
    assert path == str(cache / "tiny_mae.pth") and cached_files(cache) == ["tiny_mae.pth"]
    assert open(path, "rb").read() == source.read_bytes()  # no .part left, the whole file
    assert "downloading" in capsys.readouterr().out
    source.unlink()  # a second download would now fail
    assert weights.resolve("tiny_mae", "--teacher") == path
    assert "downloading" not in capsys.readouterr().out
    # ... and the same strict loader reads it as any path
    report = load_pretrained(tiny_vit(), path, verbose=False)
    assert report["initialised"] == []
    teacher = distill.load_teacher(path, "vit_tiny", img_size=16, patch_size=4)
    assert not teacher.training


def test_a_path_is_left_alone(published):
    assert weights.resolve("some/dir/t.pth", "--teacher") == "some/dir/t.pth"
    assert weights.resolve(None, "--init") is None


def test_sha256_is_checked(published):
    entry, source, cache = published
    entry["sha256"] = "0" * 64
    with pytest.raises(weights.WeightsError, match="has sha256 .*not the registry's"):
        weights.resolve("tiny_mae", "--teacher")
    assert cached_files(cache) == []  # nothing a later run would trust, not even a .part
    entry["sha256"] = hashlib.sha256(source.read_bytes()).hexdigest()
    assert os.path.isfile(weights.resolve("tiny_mae", "--teacher"))


def test_a_truncated_file_is_refused_and_nothing_is_cached(published):
    entry, source, cache = published
    whole = source.read_bytes()
    source.write_bytes(whole[:len(whole) // 2])  # what a server cut short would give
    with pytest.raises(weights.WeightsError, match="cut short.*nothing was cached"):
        weights.resolve("tiny_mae", "--teacher")
    assert cached_files(cache) == []
    entry["size"] = len(whole)  # with a size in the registry the check needs no zip
    with pytest.raises(weights.WeightsError, match=f"not the {len(whole)} of the published"):
        weights.resolve("tiny_mae", "--teacher")
    assert cached_files(cache) == []


class ShortResponse(io.BytesIO):
    """A response that announces more bytes than it sends, or breaks off with an error."""

    def __init__(self, body, announced, fail_after=None):
        super().__init__(body)
        self.headers = {"Content-Length": str(announced)}
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(min(n, 100))


def test_fewer_bytes_than_content_length_are_refused(published, monkeypatch):
    entry, source, cache = published
    body = source.read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: ShortResponse(body[:500], len(body)))
    with pytest.raises(weights.WeightsError, match=f"stopped at 500 of the {len(body)} bytes"):
        weights.resolve("tiny_mae", "--teacher")
    assert cached_files(cache) == []


def test_a_download_broken_off_leaves_nothing(published, monkeypatch):
    entry, source, cache = published
    body = source.read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: ShortResponse(body, len(body), fail_after=300))
    with pytest.raises(weights.WeightsError, match="stopped after 300 bytes.*nothing was cached"):
        weights.resolve("tiny_mae", "--teacher")
    assert cached_files(cache) == []


def test_without_network_one_line_names_the_url_and_the_place(published, monkeypatch):
    entry, source, cache = published

    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(weights.WeightsError) as error:
        weights.resolve("tiny_mae", "--init")
    message = str(error.value)
    assert "\n" not in message and "without network" in message
    assert entry["url"] in message and str(cache / "tiny_mae.pth") in message
    assert "give that path to --init" in message and cached_files(cache) == []


def test_a_cache_folder_that_cannot_be_written(published, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a folder below a file cannot be made, even by root
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(blocker / "hub"))
    with pytest.raises(weights.WeightsError, match="cannot write the weights cache .*TORCH_HOME"):
        weights.resolve("tiny_mae", "--teacher")


def test_a_cached_file_is_reused_without_download_and_checked(published):
    entry, source, cache = published
    cache.mkdir(parents=True)
    (cache / "tiny_mae.pth").write_bytes(source.read_bytes())  # put there by hand
    source.unlink()
    assert weights.resolve("tiny_mae", "--teacher") == str(cache / "tiny_mae.pth")
    whole = (cache / "tiny_mae.pth").read_bytes()
    (cache / "tiny_mae.pth").write_bytes(whole[:-100])  # damaged in the cache
    with pytest.raises(weights.WeightsError, match="the cached .* cut short.*delete it"):
        weights.resolve("tiny_mae", "--teacher")
    (cache / "tiny_mae.pth").write_bytes(whole)
    entry["sha256"] = "f" * 64
    with pytest.raises(weights.WeightsError, match="the cached .*sha256"):
        weights.resolve("tiny_mae", "--teacher")


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(weights.WeightsError) as error:
        weights.resolve("mae_vit_bse", "--teacher")
    assert all(name in str(error.value) for name in weights.WEIGHTS)


@pytest.mark.parametrize("script, argv", [
    (mae, ["--teacher", "mae_vit_bse"]),
    (mae, ["--init", "mae_vit_bse"]),
    (finetune, ["--init", "mae_vit_bse"]),
])
def test_an_unknown_name_is_one_line_in_the_scripts(script, argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        script.main(argv + ["--out-dir", str(tmp_path / "o")])
    message = stopped.value.code
    assert isinstance(message, str) and "\n" not in message and message.startswith("error:")
    assert "mae_vit_base, mae_vit_large" in message
    assert "Traceback" not in capsys.readouterr().err


def test_the_registry_states_what_the_scripts_need():
    assert {"mae_vit_base", "mae_vit_large"} <= set(weights.WEIGHTS)
    for name, entry in weights.WEIGHTS.items():
        assert entry["url"].startswith("https://dl.fbaipublicfiles.com/mae/pretrain/")
        assert entry["model"] in ("vit_base", "vit_large") and entry["licence"] == "CC BY-NC 4.0"
        assert (entry["img_size"], entry["patch_size"]) == (224, 16)


@pytest.mark.parametrize("script", [mae, finetune])
def test_list_weights(script, capsys):
    with pytest.raises(SystemExit) as stopped:
        script.main(["--list-weights", "--epochs", "0"])  # printed before any flag is checked
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    for name, entry in weights.WEIGHTS.items():
        assert name in out and entry["url"] in out and entry["model"] in out
    assert "CC BY-NC 4.0" in out


def test_a_published_teacher_names_its_architecture(published, tmp_path):
    args = mae.parse_args(["--teacher", "tiny_mae", "--img-size", "16", "--patch-size", "4",
                           "--out-dir", str(tmp_path / "o")])
    assert args.teacher_model == "vit_tiny"
    assert args.teacher == str(published[2] / "tiny_mae.pth")


def test_a_published_init_names_its_architecture(published, tmp_path):
    args = mae.parse_args(["--init", "tiny_mae", "--out-dir", str(tmp_path / "o")])
    assert (args.model, args.img_size, args.patch_size) == ("vit_tiny", 16, 4)
    assert args.init == str(published[2] / "tiny_mae.pth")
    args = finetune.parse_args(["--init", "tiny_mae", "--out-dir", str(tmp_path / "f")])
    assert (args.model, args.img_size, args.patch_size) == ("vit_tiny", 16, 4)


def test_distill_layer_on_real_data_takes_the_papers_teacher_by_name(tmp_path, monkeypatch,
                                                                     capsys):
    """Real data at 224 px, patch 16, no --teacher: mae_vit_base, said in the first lines."""
    source = tmp_path / "mae_pretrain_vit_base.pth"
    source.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: only the download is tested
    entry = dict(weights.WEIGHTS["mae_vit_base"], url=source.as_uri())
    monkeypatch.setattr(weights, "WEIGHTS", {"mae_vit_base": entry})
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "imgs" / "train" / "a").mkdir(parents=True)
    args = mae.parse_args(["--distill-layer", "12", "--recon-layer", "8", "--data", "imagefolder",
                           "--data-root", str(tmp_path / "imgs"), "--out-dir", str(tmp_path / "o")])
    assert args.teacher_model == "vit_base"
    assert args.teacher == str(tmp_path / "hub" / "checkpoints" / "mae_pretrain_vit_base.pth")
    first = capsys.readouterr().out.splitlines()[0]
    assert "--teacher mae_vit_base --teacher-model vit_base" in first and "CC BY-NC" in first


def test_init_with_other_patches_names_the_patch_size(tmp_path):
    path = tmp_path / "p8.pth"
    torch.save({"model": ViT(img_size=32, patch_size=8).state_dict()}, path)
    with pytest.raises(CheckpointError, match="8-px patches but this model into 4-px ones: use "
                                              "--patch-size 8 --img-size 32"):
        load_pretrained(ViT(img_size=32, patch_size=4), str(path), verbose=False)


def test_weights_py_lists_and_downloads_ahead_of_a_run(published, capsys):
    entry, source, cache = published
    weights.main([])
    assert "tiny_mae" in capsys.readouterr().out and cached_files(cache) == []
    weights.main(["tiny_mae"])
    assert cached_files(cache) == ["tiny_mae.pth"]
    with pytest.raises(SystemExit) as stopped:
        weights.main(["mae_vit_bse"])
    assert stopped.value.code == 2 and "the names are tiny_mae" in capsys.readouterr().err
