"""weights.py: published weights by name: the registry, the download into the hub cache, the checks.

    python mae.py --list-weights                          # the names, architectures, licences
    python weights.py mae_vit_base                        # download into the cache ahead of time
    python mae.py --data imagefolder --data-root DIR --teacher mae_vit_base --distill-layer 12
    python finetune.py --init mae_vit_base --data imagefolder --data-root DIR

`--teacher` and `--init` take a name of WEIGHTS as well as a path. A name is downloaded once into
torch.hub.get_dir()/checkpoints (as torch.hub and timm do), through a `.part` file that is renamed
only when the whole file has arrived and passed its checks, so an interrupted download never
leaves a file that looks whole. After that it is just a path: the same strict loader
(checkpoints.load_pretrained) reads it.
"""
import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
import zipfile

import torch
from tqdm import tqdm

from checkpoints import CheckpointError


class WeightsError(CheckpointError):
    """A published weight that cannot be had (the message names the fix)."""


FAIR_MAE = "https://dl.fbaipublicfiles.com/mae/pretrain/"
# Each entry: the architecture (--model / --teacher-model) and the image and patch size it was
# trained at, where it comes from and under which licence. size (bytes) and sha256 are checked
# when given; FAIR publishes neither for these files, so none is recorded (none is guessed).
WEIGHTS = {
    "mae_vit_base": dict(
        model="vit_base", img_size=224, patch_size=16, url=FAIR_MAE + "mae_pretrain_vit_base.pth",
        what="FAIR's MAE ViT-B/16 pre-trained encoder, the papers' D-MAE / D²-MAE teacher",
        source="github.com/facebookresearch/mae (README)", licence="CC BY-NC 4.0",
        size=None, sha256=None),
    "mae_vit_large": dict(
        model="vit_large", img_size=224, patch_size=16,
        url=FAIR_MAE + "mae_pretrain_vit_large.pth",
        what="FAIR's MAE ViT-L/16 pre-trained encoder, TinyMIM's teacher",
        source="github.com/facebookresearch/mae (README)", licence="CC BY-NC 4.0",
        size=None, sha256=None),
    "mae_vit_base_full": dict(
        model="vit_base", img_size=224, patch_size=16,
        url=FAIR_MAE + "mae_pretrain_vit_base_full.pth",
        what="FAIR's MAE ViT-B/16 with its norm-pix decoder, to continue pre-training (--init)",
        source="github.com/facebookresearch/mae issue #8", licence="CC BY-NC 4.0",
        size=None, sha256=None),
    "mae_vit_large_full": dict(
        model="vit_large", img_size=224, patch_size=16,
        url=FAIR_MAE + "mae_pretrain_vit_large_full.pth",
        what="FAIR's MAE ViT-L/16 with its norm-pix decoder, to continue pre-training (--init)",
        source="github.com/facebookresearch/mae issue #8", licence="CC BY-NC 4.0",
        size=None, sha256=None),
}


def cache_dir():
    """Where names are downloaded: torch's hub cache ($TORCH_HOME/hub/checkpoints, by default
    ~/.cache/torch/hub/checkpoints), shared with torch.hub and timm."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def cache_path(name):
    return os.path.join(cache_dir(), os.path.basename(WEIGHTS[name]["url"]))


def names_text():
    return ", ".join(WEIGHTS)


def stated_args(name):
    """The architecture flags a name states (as our checkpoints' args do), {} for a path."""
    if name not in WEIGHTS:
        return {}
    entry = WEIGHTS[name]
    return {"model": entry["model"], "img_size": entry["img_size"],
            "patch_size": entry["patch_size"]}


def resolve(name_or_path, flag):
    """--teacher / --init: a name of WEIGHTS -> the path of its verified file in the cache
    (downloaded once); a path -> itself (the loader checks it); a word that is neither -> a
    WeightsError listing the names. None stays None."""
    if name_or_path is None:
        return None
    if name_or_path in WEIGHTS:
        return fetch(name_or_path, flag)
    word = not os.path.exists(name_or_path) and not any(c in name_or_path for c in "./\\")
    if word:
        raise WeightsError(f"{flag} {name_or_path} is neither a file nor a published weight "
                           f"name: the names are {names_text()} (--list-weights shows them); "
                           "or give a checkpoint's path")
    return name_or_path


def fetch(name, flag):
    """The cached file of `name`, downloaded first if it is not there. A cached file is checked
    (whole zip archive; size and sha256 where the registry gives them) before it is trusted."""
    entry = WEIGHTS[name]
    path = cache_path(name)
    if os.path.isfile(path):
        problem = check_file(path, entry)
        if problem:
            raise WeightsError(f"the cached {path} {problem}, so it is not {name}: delete it "
                               "and run again (it is downloaded anew)")
        return path
    print(f"{flag} {name}: {entry['what']}, {entry['licence']}; downloading {entry['url']} "
          f"into {path}", flush=True)
    download(entry["url"], path, entry, name, flag)
    return path


def download(url, path, entry, name, flag):
    """url -> path through path.<pid>.part, renamed only when every byte the server announced
    (Content-Length) has arrived and check_file passes; on any failure the part file is removed
    and a WeightsError names the fix."""
    folder = os.path.dirname(path)
    part = f"{path}.{os.getpid()}.part"
    by_hand = (f"fetch {url} by hand and put it at {path} (or anywhere, and give that path to "
               f"{flag})")
    try:
        os.makedirs(folder, exist_ok=True)
        out = open(part, "wb")
    except OSError as e:
        raise WeightsError(f"cannot write the weights cache {folder} ({e.strerror or e}): set "
                           "TORCH_HOME to a writable folder (the cache is "
                           f"$TORCH_HOME/hub/checkpoints), or {by_hand}") from None
    got = 0
    try:
        with out:
            try:
                response = urllib.request.urlopen(url, timeout=60)
            except urllib.error.HTTPError as e:
                raise WeightsError(f"cannot download {name}: the server answered HTTP {e.code} "
                                   f"({e.reason}); {by_hand}") from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", None) or e
                raise WeightsError(f"cannot download {name} ({reason}); without network, "
                                   f"{by_hand}") from None
            with response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                sha = hashlib.sha256()
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=name) as bar:
                    while True:
                        try:
                            chunk = response.read(1 << 20)
                        except OSError as e:  # a connection reset, a timeout
                            raise WeightsError(
                                f"the download of {name} stopped after {got} bytes ({e}): "
                                f"nothing was cached; run again, or {by_hand}") from None
                        if not chunk:
                            break
                        try:
                            out.write(chunk)
                        except OSError as e:  # a full disk
                            raise WeightsError(
                                f"cannot write {part} ({e.strerror or e}): free space there or "
                                f"set TORCH_HOME to another folder; nothing was cached") from None
                        sha.update(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
        if total is not None and got != total:
            raise WeightsError(f"the download of {name} stopped at {got} of the {total} bytes "
                               f"{url} announced: nothing was cached; run again, or {by_hand}")
        problem = check_file(part, entry, sha.hexdigest())
        if problem:
            raise WeightsError(f"the file downloaded from {url} {problem}: nothing was cached; "
                               f"run again, or {by_hand}")
        os.replace(part, path)  # atomic: a file at `path` is always whole
    finally:
        if os.path.exists(part):
            os.remove(part)


def check_file(path, entry, sha256=None):
    """What is wrong with a file that should be `entry` (None: nothing found): a size or sha256
    other than the registry's, or a torch.save zip archive without its end record (cut short;
    the test that works without a checksum). sha256: the digest already computed, if any."""
    size = os.path.getsize(path)
    if entry.get("size") is not None and size != entry["size"]:
        return f"is {size} bytes, not the {entry['size']} of the published file (cut short?)"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return f"is a zip archive cut short ({size} bytes, no end record)"
    if not head.startswith(b"PK") and head[:1] != b"\x80":  # neither zip nor a legacy pickle
        return f"is not a PyTorch checkpoint (it begins with {head!r})"
    if entry.get("sha256"):
        if sha256 is None:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            sha256 = digest.hexdigest()
        if sha256 != entry["sha256"]:
            return f"has sha256 {sha256[:16]}..., not the registry's {entry['sha256'][:16]}..."
    return None


def weights_table():
    """The registry as the text --list-weights prints."""
    lines = [f"{'name':<20} {'architecture':<13} {'licence':<13} source / what"]
    for name, entry in WEIGHTS.items():
        lines.append(f"{name:<20} {entry['model']:<13} {entry['licence']:<13} {entry['url']}")
        lines.append(f"{'':<48} {entry['what']}; listed in {entry['source']}")
    lines.append(f"cached in {cache_dir()} (set TORCH_HOME to move it)")
    return "\n".join(lines)


class ListWeights(argparse.Action):
    """--list-weights: print weights_table() and exit, before any other flag is checked (as
    --help does)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(weights_table())
        parser.exit()


def main(argv=None):
    """python weights.py: the table; python weights.py NAME...: each file into the cache (on a
    machine with internet, ahead of a run on one without)."""
    parser = argparse.ArgumentParser(description="published weights by name: list them, or "
                                     "download some into torch's hub cache")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"weights to download ({names_text()}); none: list them")
    args = parser.parse_args(argv)
    if not args.names:
        print(weights_table())
    for name in args.names:
        if name not in WEIGHTS:
            parser.error(f"unknown name {name}: the names are {names_text()}")
        try:
            print(f"{name}: {resolve(name, 'weights.py')}")
        except WeightsError as e:
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
