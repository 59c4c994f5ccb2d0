"""The loader reads CIFAR-100's real on-disk format exactly, and refuses anything else by name."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torchvision

from cifarray.data import cifar
from cifarray.data.cifar import load_cifar100
from cifarray.data.py2pickle import dumps_py2
from cifarray.errors import DataError, UserError
from conftest import run_cli_here, run_module, write_py2_folder


def torchvision_reader(root: Path, train: bool):
    """torchvision's own CIFAR100 reader on our folder (its md5 checks disabled: the files are not official)."""
    module = torchvision.datasets.cifar
    saved = module.check_integrity
    module.check_integrity = lambda *args, **kwargs: True
    try:
        return module.CIFAR100(str(root), train=train, download=False)
    finally:
        module.check_integrity = saved


def test_synth_round_trip_matches_torchvision(synth_dir):
    data = load_cifar100(synth_dir, verify=False)
    for train, split in ((True, data.train), (False, data.test)):
        ref = torchvision_reader(synth_dir, train)
        assert np.array_equal(ref.data, split.images.transpose(0, 2, 3, 1))  # torchvision keeps HWC
        assert np.array_equal(np.asarray(ref.targets), split.fine_labels)
    assert data.fine_names == torchvision_reader(synth_dir, True).classes
    assert len(data.train) == 3000 and len(data.test) == 1000 and data.synthetic


def test_py2_cpickle_folder_not_written_by_us(tmp_path):
    folder = write_py2_folder(tmp_path)
    data = load_cifar100(tmp_path, verify=False)
    ref = torchvision_reader(tmp_path, True)
    assert np.array_equal(ref.data, data.train.images.transpose(0, 2, 3, 1))
    assert np.array_equal(np.asarray(ref.targets), data.train.fine_labels)
    assert data.fine_names[:2] == ["class_0", "class_1"] and not data.synthetic
    # Row layout: first 1024 bytes are the R plane.
    raw = pickle.loads((folder / "train").read_bytes(), encoding="bytes")[b"data"]
    assert np.array_equal(data.train.images[:, 0].reshape(len(raw), -1), raw[:, :1024])
    result = run_module("cifarray.data", "check", str(tmp_path), "--no-verify")
    assert result.returncode == 0, result.stderr
    assert "300 images" in result.stdout and "100 fine" in result.stdout


def test_python3_bytes_key_pickles_load(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 50), ("test", 20)):
        fine = rng.integers(0, 100, n)
        obj = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": fine.tolist(),
               b"coarse_labels": (fine // 5).tolist(), b"filenames": [b"x.png"] * n}
        (folder / name).write_bytes(pickle.dumps(obj, protocol=4))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a"] * 100,
                                                b"coarse_label_names": [b"b"] * 20}, protocol=2))
    data = load_cifar100(tmp_path, verify=False)
    assert data.train.images.shape == (50, 3, 32, 32) and data.fine_names[0] == "a"


def test_tarball_is_read_without_extracting(synth_dir, tmp_path):
    tgz = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(synth_dir / "cifar-100-python", arcname="cifar-100-python")
    from_tar = load_cifar100(tgz, verify=False)
    from_dir = load_cifar100(synth_dir, verify=False)
    assert np.array_equal(from_tar.train.images, from_dir.train.images)
    assert load_cifar100(tmp_path, verify=False).source == str(tgz)  # the folder holding it works too
    assert list(tmp_path.iterdir()) == [tgz]  # nothing was extracted
    with pytest.raises(DataError, match="md5 .* not the official cifar-100-python.tar.gz"):
        load_cifar100(tgz, verify=True)


def test_md5_checked_by_default(tmp_path, synth_dir):
    write_py2_folder(tmp_path)
    with pytest.raises(DataError, match=r"train: md5 [0-9a-f]{32} is not the official .*--no-verify"):
        load_cifar100(tmp_path)
    with pytest.raises(DataError, match="procedural data .* pass --no-verify"):
        load_cifar100(synth_dir)


# --------------------------------------------------------------------------- malicious pickles

PAYLOADS = {
    "os.system": lambda marker: f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),
    "builtins.exec": lambda marker: f"cbuiltins\nexec\n(S'open(\"{marker}\", \"w\")'\ntR.".encode(),
    # A numpy global that is not an array constructor must be refused too.
    "numpy.testing": lambda marker: (
        f"cnumpy.testing._private.utils\nrunstring\n(S'open(\"{marker}\", \"w\")'\n}}tR.".encode()),
}


def hidden_payload(marker: Path) -> bytes:
    """A valid meta dict with one extra value computed by os.system."""
    good = dumps_py2({"fine_label_names": ["a"] * 100, "coarse_label_names": ["b"] * 20})
    cmd = f"touch {marker}".encode()
    return good[:-2] + b"U\x04evilcos\nsystem\n(U" + bytes([len(cmd)]) + cmd + b"tRu."


@pytest.mark.parametrize("name", sorted(PAYLOADS) + ["hidden"])
def test_control_payloads_do_run_under_plain_pickle(tmp_path, name):
    # Without this, the refusal tests below could pass on payloads that never worked.
    marker = tmp_path / "ran"
    payload = hidden_payload(marker) if name == "hidden" else PAYLOADS[name](marker)
    try:
        pickle.loads(payload, encoding="latin1")
    except Exception:
        pass  # the payload's side effect happens before any later error
    assert marker.exists()


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "pwned"
    root = tmp_path / "data"
    write_py2_folder(root, train=PAYLOADS[name](marker))
    with pytest.raises(DataError, match="refused to load: the pickle references"):
        load_cifar100(root, verify=False)
    result = run_cli_here("cifarray.data", "check", str(root), "--no-verify")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cifar-100-python/train" in lines[0]
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_payload_hidden_inside_a_valid_looking_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    write_py2_folder(tmp_path, meta=hidden_payload(marker))
    with pytest.raises(DataError, match=r"meta: refused to load: the pickle references os\.system"):
        load_cifar100(tmp_path, verify=False)
    assert not marker.exists()


# --------------------------------------------------------------------------- structural errors


def _split(n=10, cols=3072, fine=None, coarse=None, drop=None):
    rng = np.random.default_rng(0)
    fine = list(rng.integers(0, 100, n)) if fine is None else fine
    d = {"data": rng.integers(0, 256, (n, cols), dtype=np.uint8), "fine_labels": fine,
         "coarse_labels": [f // 5 for f in fine] if coarse is None else coarse, "filenames": ["a"] * n}
    d.pop(drop, None)
    return dumps_py2(d)


STRUCTURAL = {
    "truncated": (lambda good: good[: len(good) // 2], "train: file is truncated"),
    "corrupt opcodes": (lambda good: good[:2] + b"\xff" + good[3:], "train: file is corrupt"),
    "wrong shape": (lambda good: _split(cols=3000), r"train: 'data' is uint8 of shape \(10, 3000\)"),
    "label out of range": (lambda good: _split(fine=[3] * 9 + [100]), "train: 'fine_labels' has label 100 out of range"),
    "coarse out of range": (lambda good: _split(coarse=[20] * 10), "train: 'coarse_labels' has label 20"),
    "label count": (lambda good: _split(fine=[1] * 9), "train: 'fine_labels' has 9 entries for 10 images"),
    "no labels (CIFAR-10)": (lambda good: _split(drop="fine_labels"), "train: no 'fine_labels' entry"),
    "not a dict": (lambda good: dumps_py2([1, 2, 3]), "train: expected a dict"),
}


@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_structural_errors_name_file_and_problem(tmp_path, case):
    make, message = STRUCTURAL[case]
    good = _split()
    write_py2_folder(tmp_path, train=make(good))
    with pytest.raises(DataError, match=message):
        load_cifar100(tmp_path, verify=False)


def test_meta_errors(tmp_path):
    write_py2_folder(tmp_path, meta=dumps_py2({"fine_label_names": ["a"] * 99, "coarse_label_names": ["b"] * 20}))
    with pytest.raises(DataError, match="meta: missing or malformed 'fine_label_names'"):
        load_cifar100(tmp_path, verify=False)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match="missing meta"):
        load_cifar100(tmp_path, verify=False)
    result = run_cli_here("cifarray.data", "check", str(tmp_path), "--no-verify")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "missing meta" in result.stderr


def test_missing_data_names_path_and_fix(tmp_path):
    with pytest.raises(DataError, match="no cifar-100-python/ folder .* cifarray.data download"):
        load_cifar100(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        load_cifar100(tmp_path / "nope")


def test_synth_never_overwrites_foreign_data(tmp_path):
    folder = write_py2_folder(tmp_path)
    before = (folder / "train").read_bytes()
    result = run_module("cifarray.data", "synth", str(tmp_path), "--train-per-class", "1", "--test-per-class", "1")
    assert result.returncode == 2 and "was not written by `cifarray.data synth`" in result.stderr
    assert (folder / "train").read_bytes() == before


def test_synth_is_deterministic_and_guards_its_parameters(tmp_path):
    from cifarray.data.synth import write_synthetic

    a = write_synthetic(tmp_path / "a", train_per_class=2, test_per_class=1, seed=3)
    b = write_synthetic(tmp_path / "b", train_per_class=2, test_per_class=1, seed=3)
    assert (a / "train").read_bytes() == (b / "train").read_bytes()
    with pytest.raises(UserError, match="other parameters; pass --force"):
        write_synthetic(tmp_path / "a", train_per_class=3, test_per_class=1, seed=3)
    write_synthetic(tmp_path / "a", train_per_class=3, test_per_class=1, seed=3, force=True)
    assert len(load_cifar100(tmp_path / "a", verify=False).train) == 300


def test_validation_split_is_seeded_and_disjoint():
    tr, va = cifar.validation_split(1000, 100, seed=5)
    tr2, va2 = cifar.validation_split(1000, 100, seed=5)
    assert np.array_equal(va, va2) and len(va) == 100 and len(tr) == 900
    assert not set(tr) & set(va) and set(tr) | set(va) == set(range(1000))
    assert not np.array_equal(va, cifar.validation_split(1000, 100, seed=6)[1])
    with pytest.raises(DataError, match="validation size"):
        cifar.validation_split(100, 100)
