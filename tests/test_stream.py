"""Streaming data larger than memory: one checking pass, chunks, bounded RSS."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnnet import MLP, stream, train
from fnnet.cli import main
from fnnet.data import DataError

ROOT = Path(__file__).resolve().parent.parent
D = 4


def _table(n, seed=0, d=D):
    """(n, d + 1) float32 rows: features, then a 0/1 label in the last column."""
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    return np.column_stack([x, y])


@pytest.fixture(scope="module")
def net_params():
    net = MLP(sizes=(D, 8, 2), output="softmax", loss="cross_entropy")
    return net, net.init(jax.random.key(0), jnp.float32)


CONFIG = train.TrainConfig(
    epochs=2, batch_size=32, optimizer="adam", learning_rate=0.01, patience=None
)


def test_one_chunk_trains_exactly_like_the_arrays(tmp_path, net_params):
    net, params = net_params
    np.save(tmp_path / "d.npy", _table(256))
    whole = stream.open_stream(
        tmp_path / "d.npy", chunk_rows=256, val_fraction=0.0, test_fraction=0.0
    )
    (x, y), *rest = list(whole.source("train"))
    assert rest == [] and x.shape == (256, D) and y.dtype == np.int32
    streamed = train.fit(net, params, whole.source("train"), None, CONFIG)
    arrays = train.fit(net, params, (x, y), None, CONFIG)
    for a, b in zip(
        jax.tree.leaves(streamed.params), jax.tree.leaves(arrays.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert streamed.history == arrays.history

    # Four chunks (training on them: the memory test below): each epoch reads
    # every row once, in another order.
    chunked = stream.open_stream(
        tmp_path / "d.npy", chunk_rows=64, val_fraction=0.0, test_fraction=0.0
    )
    src = chunked.source("train")
    ids = [np.concatenate([c[0][:, 0] for c in src.shuffled(0, e)]) for e in (1, 2)]
    assert [len(c[0]) for c in src.shuffled(0, 1)] == [64] * 4
    np.testing.assert_array_equal(np.sort(ids[0]), np.sort(x[:, 0]))
    assert not np.array_equal(ids[0], ids[1])


def test_evaluate_chunks_merges_r2_and_loss_exactly():
    net = MLP(sizes=(3, 5, 2), output="identity", loss="mse")
    params = net.init(jax.random.key(1), jnp.float64)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(90, 3)), rng.normal(size=(90, 2)) + 3.0
    whole = train.evaluate(net, params, x, y)
    parts = train.evaluate_chunks(net, params, [(x[:40], y[:40]), (x[40:], y[40:])])
    assert whole.keys() == parts.keys()
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], rtol=1e-12)


def test_fit_refuses_a_one_shot_iterator_and_unsupported_options(net_params):
    net, params = net_params
    chunk = (np.zeros((4, D), np.float32), np.zeros(4, np.int32))
    with pytest.raises(TypeError, match="must be re-iterable"):
        train.fit(net, params, iter([chunk]), None, CONFIG)
    with pytest.raises(ValueError, match="devices and check_every need"):
        train.fit(net, params, {"not": "arrays"}.values(), None, CONFIG, check_every=1)


def _shards(folder, sizes, seed=0):
    folder.mkdir()
    parts = [_table(n, seed + i) for i, n in enumerate(sizes)]
    for i, p in enumerate(parts):
        np.save(folder / f"part{i}.npy", p)
    return np.concatenate(parts)


def test_one_pass_gives_the_training_rows_statistics(tmp_path):
    rows = _shards(tmp_path / "shards", [300, 170, 230])
    rows[:, 2] = 7.0  # a constant column: std 1
    for i, n in enumerate([300, 170, 230]):
        start = sum([300, 170, 230][:i])
        np.save(tmp_path / "shards" / f"part{i}.npy", rows[start : start + n])
    opened = [
        stream.open_stream(tmp_path / "shards", chunk_rows=c, seed=3) for c in (64, 500)
    ]
    a, b = opened
    assert a.sizes == b.sizes and sum(a.sizes) == 700  # the split ignores chunking
    assert a.task == "classification" and a.classes == (0, 1)
    codes = np.concatenate(
        [
            stream.split_codes(3, i, 0, n, 0.15, 0.2)
            for i, n in enumerate([300, 170, 230])
        ]
    )
    train_rows = rows[codes == 0, :D].astype(np.float64)
    mean, std = train_rows.mean(0), train_rows.std(0)
    std[2] = 1.0
    for s in opened:
        np.testing.assert_allclose(s.x_mean, mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(s.x_std, std, rtol=1e-12)
    assert abs(a.sizes[1] / 700 - 0.15) < 0.06 and abs(a.sizes[2] / 700 - 0.2) < 0.06
    # Each split's rows, standardized, in file order.
    got = np.concatenate([x for x, _ in a.source("val")])
    want = ((rows[codes == 1, :D] - mean) / std).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def _bad_files(tmp_path):
    good = _table(40)
    nan, inf = good.copy(), good.copy()
    nan[17, 2] = np.nan
    inf[33, 4] = np.inf
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "inf.npy", inf)
    np.save(tmp_path / "text.npy", good.astype(str))
    np.save(tmp_path / "objects.npy", np.array([[1, "a"]] * 6, dtype=object))
    np.savez_compressed(tmp_path / "packed.npz", x=good[:, :D], y=good[:, D])
    (tmp_path / "ragged").mkdir()
    np.save(tmp_path / "ragged" / "a.npy", good)
    np.save(tmp_path / "ragged" / "b.npy", good[:, 1:])
    (tmp_path / "badshard").mkdir()
    np.save(tmp_path / "badshard" / "a.npy", good)
    np.save(tmp_path / "badshard" / "b.npy", nan)
    return {
        "nan.npy": ("nan.npy: NaN in the features at row 17, column 2",),
        "inf.npy": ("inf.npy: infinite value in the targets at row 33",),
        "text.npy": ("text.npy: the array must be numeric", "<U"),
        "objects.npy": ("objects.npy: the file is an object array", "never unpickles"),
        "packed.npz": ("packed.npz: array 'x' is compressed", "np.savez"),
        "ragged": ("b.npy: ragged shards: 4 columns, expected 5", "a.npy"),
        "badshard": ("badshard/b.npy: NaN in the features at row 17, column 2",),
    }


def test_bad_data_is_named_by_shard_and_row_before_training(tmp_path, capsys):
    for name, parts in _bad_files(tmp_path).items():
        with pytest.raises(DataError) as err:
            stream.open_stream(tmp_path / name, chunk_rows=8)
        for part in parts:
            assert part in str(err.value), (name, str(err.value))
    # From the command line: exit 2, the message, and no run started.
    out = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path / "badshard"), "--out", str(out)])
    assert code == 2 and not (out / "checkpoint.npz").exists()
    assert "b.npy: NaN in the features at row 17" in capsys.readouterr().err


def test_npz_members_stream_with_string_labels(tmp_path):
    t = _table(60)
    labels = np.where(t[:, D] > 0, "yes", "no")
    np.savez(tmp_path / "d.npz", x=t[:, :D], y=labels)
    with zipfile.ZipFile(tmp_path / "d.npz") as z:  # np.savez stores, not deflates
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    s = stream.open_stream(tmp_path / "d.npz", chunk_rows=16, test_fraction=0.0)
    assert s.task == "classification" and s.classes == ("no", "yes")
    x, y = map(np.concatenate, zip(*s.source("train"), strict=True))
    codes = stream.split_codes(0, 0, 0, 60, 0.15, 0.0)
    np.testing.assert_array_equal(y, (labels[codes == 0] == "yes").astype(np.int32))


RSS_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from fnnet import MLP, stream, train

small, big, rows, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

net = MLP(sizes=(width, 8, 2), output="softmax", loss="cross_entropy")
params = net.init(jax.random.key(0), jnp.float32)
config = train.TrainConfig(epochs=1, batch_size=512, learning_rate=0.1,
                           optimizer="sgd", patience=None)

def run(path):
    data = stream.open_stream(path, chunk_rows=rows, val_fraction=0.0,
                              test_fraction=0.0)
    return train.fit(net, params, data.source("train"), None, config)

run(small)  # compiles every function at the chunk's shape
before = kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current RSS
result = run(big)
print(json.dumps({"before": before, "peak": kib("VmHWM"),
                  "stopped": result.stopped,
                  "accuracy": result.history[-1]["train_accuracy"]}))
"""


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's clear_refs"
)
def test_peak_memory_is_bounded_by_the_chunk_not_the_file(tmp_path):
    width, rows, chunks = 63, 16384, 24  # 4 MiB chunks, a 96 MiB file
    chunk_bytes = rows * (width + 1) * 4
    x = np.random.default_rng(0).normal(size=(rows, width + 1)).astype(np.float32)
    x[:, -1] = x[:, 0] > 0
    np.save(tmp_path / "small.npy", np.concatenate([x, x]))
    with open(tmp_path / "big.npy", "wb") as f:  # written chunk by chunk
        header = {"descr": "<f4", "fortran_order": False, "shape": (rows * chunks, 64)}
        np.lib.format.write_array_header_1_0(f, header)
        for _ in range(chunks):
            x.tofile(f)
    file_bytes = (tmp_path / "big.npy").stat().st_size
    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "small.npy"),
         str(tmp_path / "big.npy"), str(rows), str(width)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        # Large blocks straight from mmap and back on free: RSS then counts
        # live memory, not what glibc's heap keeps for later.
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["stopped"] == "completed" and m["accuracy"] > 0.9  # it learned
    grew = (m["peak"] - m["before"]) * 1024
    # A few chunks in flight: the block read, its float64 statistics copy, the
    # packed chunk and its device copy. Loading the file would add 96 MiB.
    budget = 8 * chunk_bytes
    assert budget < file_bytes / 2
    assert grew < budget, f"peak grew {grew / 2**20:.1f} MiB; budget 32 MiB"


def test_fnnet_train_streams_a_folder_of_shards(tmp_path, capsys):
    _shards(tmp_path / "shards", [96, 64])
    out = tmp_path / "run"
    code = main(
        ["train", "--data", str(tmp_path / "shards"), "--chunk-rows", "32",
         "--hidden", "8", "--epochs", "2", "--quiet", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["chunk_rows"] == 32 and metrics["epochs_run"] == 2
    assert 0 <= metrics["test_accuracy"] <= 1 and "val_accuracy" in metrics
    code = main(["train", "--chunk-rows", "8", "--out", str(tmp_path / "r2")])
    assert code == 2
    assert "--chunk-rows streams a .npy" in capsys.readouterr().err
