"""Tests for fnnet.data: loaders, checks, stratified splits, standardization."""

import ast
import pathlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fnnet import data
from fnnet.data import DataError

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def indexed_classification(n_per_class=(30, 20, 10), d=3, seed=0):
    """x whose column 0 is the row index; y in 0..K-1 (class c has n[c] rows)."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    x = rng.normal(size=(len(y), d))
    x[:, 0] = np.arange(len(y))
    return x, y


def recover_index(ds, x):
    """Column 0 (the row index) of standardized x, back in original units."""
    return np.rint(x[:, 0].astype(np.float64) * ds.x_std[0] + ds.x_mean[0]).astype(int)


def assert_partition(parts, n):
    idx = [np.asarray(p, dtype=int) for p in parts]
    joined = np.concatenate(idx)
    assert len(joined) == n, "the splits together must have every row once"
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


CSV_HEADER = """\
a,b,label
1.0,2.0,0
2.0,3.5,1
3.0,1.0,0
4.0,0.5,1
5.0,2.5,0
6.0,3.0,1
"""


# --------------------------------------------------------------------------
# Module hygiene
# --------------------------------------------------------------------------


def test_data_module_does_not_import_jax_or_sklearn_at_top_level():
    source = pathlib.Path(data.__file__).read_text()
    tree = ast.parse(source)
    top = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            top.append(node.module)
    assert not [m for m in top if m.split(".")[0] in ("jax", "sklearn", "pickle")]
    assert "allow_pickle=True" not in source


# --------------------------------------------------------------------------
# Builtin data sets
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, task, n, d, k",
    [
        ("digits", "classification", 1797, 64, 10),
        ("breast_cancer", "classification", 569, 30, 2),
        ("iris", "classification", 150, 4, 3),
        ("wine", "classification", 178, 13, 3),
        ("diabetes", "regression", 442, 10, 1),
    ],
)
def test_builtin_loads_offline(name, task, n, d, k):
    ds = data.load_dataset(name)
    assert ds.name == name and ds.task == task == data.BUILTIN[name]
    assert ds.num_features == d and ds.num_outputs == k
    assert len(ds.x_train) + len(ds.x_val) + len(ds.x_test) == n
    n_val, n_test = round(0.15 * n), round(0.2 * n)
    assert (len(ds.x_val), len(ds.x_test)) == (n_val, n_test)
    for x, y in (
        (ds.x_train, ds.y_train),
        (ds.x_val, ds.y_val),
        (ds.x_test, ds.y_test),
    ):
        assert x.dtype == np.float32 and x.shape[1:] == (d,)
        assert len(y) == len(x)
        if task == "classification":
            assert y.dtype == np.int32 and y.ndim == 1
            assert set(np.unique(y)) == set(range(k)), "every split has every class"
        else:
            assert y.dtype == np.float32 and y.shape[1:] == (k,)
    assert ds.x_mean.shape == ds.x_std.shape == (d,)
    if task == "classification":
        assert ds.classes == tuple(range(k))
        assert ds.y_mean.shape == ds.y_std.shape == (0,)
    else:
        assert ds.classes == ()
        assert ds.y_mean.shape == ds.y_std.shape == (1,)
    assert name in repr(ds)


def test_builtin_rejects_csv_only_target_and_contradicting_task():
    with pytest.raises(DataError, match="iris.*target=.*only to .csv"):
        data.load_arrays("iris", target=0)
    with pytest.raises(DataError, match="diabetes.*regression task.*classification"):
        data.load_arrays("diabetes", task="classification")


def test_unknown_builtin_name_lists_builtins():
    with pytest.raises(DataError, match="mnist.*unknown data set.*digits.*iris"):
        data.load_dataset("mnist")


def test_unsupported_file_type(tmp_path):
    path = write(tmp_path, "table.txt", "1,2\n")
    with pytest.raises(DataError, match=r"table\.txt.*unsupported file type '.txt'"):
        data.load_arrays(str(path))


def test_bad_task_name_is_value_error():
    with pytest.raises(ValueError, match="task must be one of.*'clasification'"):
        data.load_arrays("iris", task="clasification")


# --------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------


def test_split_is_a_partition_and_keeps_rows_with_their_labels():
    x, y = indexed_classification()
    parts = data.split(x, y, task="classification", seed=3)
    assert_partition([xs[:, 0] for xs, _ in parts], len(y))
    for xs, ys in parts:
        np.testing.assert_array_equal(y[xs[:, 0].astype(int)], ys)
        np.testing.assert_array_equal(x[xs[:, 0].astype(int)], xs)


def test_split_sizes_and_stratified_proportions():
    x, y = indexed_classification((60, 30, 10))  # N = 100
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = data.split(
        x, y, task="classification", val_fraction=0.1, test_fraction=0.2, seed=0
    )
    assert (len(y_tr), len(y_va), len(y_te)) == (70, 10, 20)
    # Proportions 60:30:10 divide these sizes exactly.
    np.testing.assert_array_equal(np.bincount(y_te), [12, 6, 2])
    np.testing.assert_array_equal(np.bincount(y_va), [6, 3, 1])
    np.testing.assert_array_equal(np.bincount(y_tr), [42, 21, 7])


@given(
    counts=st.lists(st.integers(3, 40), min_size=2, max_size=6),
    val_fraction=st.sampled_from([0.0, 0.1, 0.15, 0.25]),
    test_fraction=st.sampled_from([0.1, 0.2, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_stratified_split_property(counts, val_fraction, test_fraction, seed):
    x, y = indexed_classification(counts, d=1)
    n, k = len(y), len(counts)
    n_val = max(1, round(val_fraction * n)) if val_fraction else 0
    n_test = max(1, round(test_fraction * n))
    if min(n_test, n - n_val - n_test) < k or (n_val and n_val < k):
        with pytest.raises(DataError, match="fewer than the .* classes"):
            data.split(
                x,
                y,
                task="classification",
                val_fraction=val_fraction,
                test_fraction=test_fraction,
                seed=seed,
            )
        return
    parts = data.split(
        x,
        y,
        task="classification",
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    assert [len(p[1]) for p in parts] == [n - n_val - n_test, n_val, n_test]
    assert_partition([xs[:, 0] for xs, _ in parts], n)
    counts = np.asarray(counts)
    sizes = (n - n_val - n_test, n_val, n_test)
    got = [np.bincount(ys, minlength=k) for _, ys in parts]
    ideal = [counts * size / n for size in sizes]
    for g, size in zip(got, sizes, strict=True):
        assert size == 0 or np.all(g >= 1), "a non-empty split has every class"
    # Within rounding (one row), unless some class had to be lifted to one
    # row in a split where its share is below one row.
    if all(np.all(i >= 1) for i, size in zip(ideal, sizes, strict=True) if size):
        for g, i in zip(got, ideal, strict=True):
            assert np.all(np.abs(g - i) <= 1 + 1e-9), (g, i)


def test_stratified_split_within_one_row_when_classes_are_large():
    x, y = indexed_classification((97, 53, 31, 19))
    n = len(y)
    for seed in range(20):
        for _, ys in data.split(x, y, task="classification", seed=seed):
            ideal = np.array([97, 53, 31, 19]) * len(ys) / n
            assert np.all(np.abs(np.bincount(ys) - ideal) <= 1 + 1e-9)


def test_regression_split_is_a_shuffled_partition():
    rng = np.random.default_rng(0)
    x = np.column_stack([np.arange(50.0), rng.normal(size=50)])
    y = rng.normal(size=(50, 2))
    parts = data.split(x, y, task="regression", val_fraction=0.2, test_fraction=0.2)
    assert [len(p[0]) for p in parts] == [30, 10, 10]
    assert_partition([xs[:, 0] for xs, _ in parts], 50)
    for xs, ys in parts:
        np.testing.assert_array_equal(y[xs[:, 0].astype(int)], ys)
    assert not np.array_equal(np.sort(parts[0][0][:, 0]), np.arange(30.0))


@pytest.mark.parametrize("task", data.TASKS)
def test_split_is_deterministic_per_seed(task):
    x, y = indexed_classification()
    a = data.split(x, y, task=task, seed=7)
    b = data.split(x, y, task=task, seed=7)
    c = data.split(x, y, task=task, seed=8)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], c[0][0])


def test_load_dataset_is_deterministic_per_seed():
    a, b = data.load_dataset("wine", seed=5), data.load_dataset("wine", seed=5)
    c = data.load_dataset("wine", seed=6)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


@pytest.mark.parametrize(
    "task, y_shape", [("classification", ()), ("regression", (2,))]
)
def test_zero_val_fraction_gives_empty_val_split(tmp_path, task, y_shape):
    x, y = indexed_classification((20, 20))
    if task == "regression":
        y = np.column_stack([y + 0.5, -y + 0.25])
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    ds = data.load_dataset(str(path), task=task, val_fraction=0.0)
    assert ds.x_val.shape == (0, 3) and ds.x_val.dtype == np.float32
    assert ds.y_val.shape == (0, *y_shape)
    assert len(ds.x_train) + len(ds.x_test) == 40


def test_split_rejects_bad_fractions():
    x, y = indexed_classification()
    with pytest.raises(ValueError, match="test_fraction must be in"):
        data.split(x, y, task="classification", test_fraction=1.0)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        data.split(x, y, task="classification", val_fraction=-0.1)
    with pytest.raises(ValueError, match=r"val_fraction \+ test_fraction"):
        data.split(x, y, task="classification", val_fraction=0.5, test_fraction=0.5)


def test_class_too_small_to_stratify(tmp_path):
    x, y = indexed_classification((20, 20, 2))
    path = tmp_path / "small_class.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(DataError, match=r"small_class\.npz.*class 2 has 2 example"):
        data.load_dataset(str(path))
    # Without a validation split two members are enough.
    ds = data.load_dataset(str(path), val_fraction=0.0)
    assert set(np.unique(ds.y_test)) == {0, 1, 2}


# --------------------------------------------------------------------------
# Standardization
# --------------------------------------------------------------------------


def test_standardize_uses_training_rows_only():
    rng = np.random.default_rng(0)
    x_tr = rng.normal(3.0, 2.0, size=(200, 4))
    x_te = rng.normal(5.0, 1.0, size=(50, 4))
    mean, std, (s_tr, s_te) = data.standardize(x_tr, x_te)
    np.testing.assert_allclose(mean, x_tr.mean(0))
    np.testing.assert_allclose(std, x_tr.std(0))
    np.testing.assert_allclose(s_tr.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(s_tr.std(0), 1, atol=1e-12)
    np.testing.assert_allclose(s_te, (x_te - x_tr.mean(0)) / x_tr.std(0))
    assert np.all(np.abs(s_te.mean(0)) > 0.1)


def test_standardize_constant_column_has_unit_std():
    x = np.column_stack([np.full(10, 0.1), np.arange(10.0)])
    mean, std, (s,) = data.standardize(x)
    assert std[0] == 1.0
    np.testing.assert_allclose(s[:, 0], 0.0, atol=1e-15)
    assert np.all(np.isfinite(s))


def test_standardize_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"others\[0\] must have trailing shape"):
        data.standardize(np.zeros((3, 2)), np.zeros((3, 3)))


def test_dataset_statistics_come_from_the_training_split():
    x, y, _ = data.load_arrays("diabetes")
    ds = data.load_dataset("diabetes")
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(0), 1, atol=1e-5)
    np.testing.assert_allclose(ds.y_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.y_train.std(0), 1, atol=1e-5)
    assert np.abs(ds.x_test.mean(0)).max() > 1e-3  # not refitted on test
    assert not np.allclose(ds.x_mean, x.mean(0), rtol=0, atol=1e-7)
    # Back to original units: the training targets are a subset of y.
    y_tr = ds.unscale_y(ds.y_train)[:, 0]
    assert np.all(np.min(np.abs(y_tr[:, None] - y[None, :]), axis=1) < 1e-3)
    np.testing.assert_allclose(ds.y_mean[0], y_tr.mean(), rtol=1e-5)


def test_load_dataset_features_match_rows_via_index_column(tmp_path):
    x, y = indexed_classification((25, 15, 10))
    path = tmp_path / "indexed.npz"
    np.savez(path, x=x, y=y)
    ds = data.load_dataset(str(path), seed=2)
    parts = [(ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)]
    index = [recover_index(ds, xs) for xs, _ in parts]
    assert_partition(index, len(y))
    for i, (_, ys) in zip(index, parts, strict=True):
        np.testing.assert_array_equal(y[i], ys)
    train_index = index[0]
    np.testing.assert_allclose(ds.x_mean, x[train_index].mean(0), rtol=1e-6)
    np.testing.assert_allclose(ds.scale_x(x[train_index]), ds.x_train, atol=1e-5)
    np.testing.assert_allclose(ds.scale_x(x[index[2]]), ds.x_test, atol=1e-5)


def test_unscale_y_is_for_regression_only():
    ds = data.load_dataset("iris")
    with pytest.raises(ValueError, match="unscale_y applies to regression"):
        ds.unscale_y(np.zeros((2, 1)))


# --------------------------------------------------------------------------
# Task inference and labels
# --------------------------------------------------------------------------


def test_infer_task():
    assert data.infer_task(np.array([0, 1, 2, 1])) == "classification"
    assert data.infer_task(np.array([0.0, 1.0, 1.0])) == "classification"
    assert data.infer_task(np.array(["cat", "dog"])) == "classification"
    assert data.infer_task(np.array([0.5, 1.0])) == "regression"
    assert data.infer_task(np.arange(51)) == "regression"  # too many values
    assert data.infer_task(np.zeros((4, 1), int)) == "regression"  # not 1-D


def test_encode_labels_keeps_original_classes_in_sorted_order():
    labels, classes = data.encode_labels(np.array(["b", "a", "c", "a"]))
    assert classes == ("a", "b", "c")
    np.testing.assert_array_equal(labels, [1, 0, 2, 0])
    assert labels.dtype == np.int32
    labels, classes = data.encode_labels(np.array([5.0, -1.0, 5.0]))
    assert classes == (-1, 5) and all(type(c) is int for c in classes)


# --------------------------------------------------------------------------
# CSV files
# --------------------------------------------------------------------------


def test_csv_with_header(tmp_path):
    path = write(tmp_path, "h.csv", CSV_HEADER)
    x, y, task = data.load_csv(path)
    assert task == "classification"
    assert x.shape == (6, 2) and x.dtype == np.float64
    np.testing.assert_array_equal(x[:, 0], [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(y, [0, 1, 0, 1, 0, 1])


def test_csv_without_header_and_blank_lines(tmp_path):
    body = "".join(CSV_HEADER.splitlines(keepends=True)[1:]) + "\n\n"
    path = write(tmp_path, "nh.csv", body)
    x, y, task = data.load_csv(path)
    assert x.shape == (6, 2) and task == "classification"
    np.testing.assert_array_equal(y, [0, 1, 0, 1, 0, 1])


def test_csv_numeric_column_names_and_text_target_name_is_a_header(tmp_path):
    text = "1,2,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(6))
    x, y, _ = data.load_csv(write(tmp_path, "n.csv", text))
    assert x.shape == (6, 2)


@pytest.mark.parametrize("target", ["a", 0, -3])
def test_csv_target_by_name_and_index(tmp_path, target):
    path = write(tmp_path, "t.csv", CSV_HEADER)
    x, y, task = data.load_csv(path, target=target, task="regression")
    assert task == "regression"
    np.testing.assert_array_equal(y, [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(x[:, 0], [2.0, 3.5, 1.0, 0.5, 2.5, 3.0])
    np.testing.assert_array_equal(x[:, 1], [0, 1, 0, 1, 0, 1])


def test_csv_string_labels(tmp_path):
    rows = ["sl,sw,species"] + [
        f"{i}.0,{(i * 7) % 5}.5,{s}"
        for i, s in enumerate(["versicolor", "setosa", "virginica"] * 4)
    ]
    path = write(tmp_path, "flowers.csv", "\n".join(rows) + "\n")
    x, y, task = data.load_arrays(str(path))
    assert task == "classification" and y.dtype.kind == "U"
    ds = data.load_dataset(str(path), val_fraction=0.0, test_fraction=0.25)
    assert ds.classes == ("setosa", "versicolor", "virginica")
    assert ds.num_outputs == 3 and ds.num_features == 2
    # Row i is versicolor/setosa/virginica for i % 3 = 0/1/2: labels 1/0/2.
    for xs, ys in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        i = recover_index(ds, xs)
        np.testing.assert_array_equal(ys, np.array([1, 0, 2])[i % 3])


def test_csv_string_target_for_regression_is_rejected(tmp_path):
    path = write(tmp_path, "s.csv", "a,b\n" + "1,x\n2,y\n3,x\n4,y\n5,x\n")
    with pytest.raises(DataError, match=r"s\.csv.*non-numeric target 'x' at line 2"):
        data.load_csv(path, task="regression")


def test_csv_load_dataset_regression(tmp_path):
    rows = "".join(f"{i},{i % 3},{0.5 * i + 0.1}\n" for i in range(40))
    path = write(tmp_path, "r.csv", rows)
    ds = data.load_dataset(str(path))
    assert ds.task == "regression" and ds.y_train.shape == (26, 1)
    i = recover_index(ds, ds.x_test)
    np.testing.assert_allclose(ds.unscale_y(ds.y_test)[:, 0], 0.5 * i + 0.1, rtol=1e-5)


# --------------------------------------------------------------------------
# NPZ files
# --------------------------------------------------------------------------


def test_npz_good_file_and_capital_x(tmp_path):
    x, y = indexed_classification((10, 10))
    path = tmp_path / "good.npz"
    np.savez(path, X=x, y=y)
    x2, y2, task = data.load_npz(path)
    assert task == "classification"
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


def test_npz_multi_target_regression(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 3))
    path = tmp_path / "multi.npz"
    np.savez(path, x=x, y=y)
    ds = data.load_dataset(str(path))
    assert ds.task == "regression" and ds.num_outputs == 3
    assert ds.y_train.shape[1:] == (3,) and ds.y_mean.shape == (3,)
    assert ds.unscale_y(ds.y_test).shape == ds.y_test.shape


# --------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nope.csv", "nope.npz"])
def test_missing_file(tmp_path, name):
    with pytest.raises(DataError, match=rf"nope\.{name[-3:]}: file not found"):
        data.load_dataset(str(tmp_path / name))


BAD_CSV = [
    ("", r"empty file"),
    ("\n\n", r"empty file"),
    ("a,b,c\n1,2,0\n3,4\n", r"ragged rows: line 3 has 2 cells, expected 3"),
    (
        "a,b,c\n1,2,0\n3,4,1\n5,nan,0\n7,8,1\n9,1,0\n",
        r"NaN cell 'nan' at line 4, column 1 \('b'\)",
    ),
    (
        "a,b,c\n1,2,0\n3,4,1\n5,6,0\n7,inf,1\n9,1,0\n",
        r"infinite cell 'inf' at line 5, column 1",
    ),
    (
        "a,b,c\n1,2,0\n3,4,1\n5,six,0\n7,8,1\n9,1,0\n",
        r"non-numeric cell 'six' at line 4, column 1 \('b'\)",
    ),
    ("1,2,0\n3,,1\n5,6,0\n7,8,1\n9,1,0\n", r"empty cell at line 2, column 1"),
    ("1,2,0\n3,4,1\n5,6,NaN\n7,8,1\n9,1,0\n", r"NaN target 'NaN' at line 3"),
    ("1,2,0\n3,4,1\n5,6,\n7,8,1\n9,1,0\n", r"empty target cell at line 3"),
    ("1,2,0\n3,4,1\n5,6,0\n", r"too few rows: 3"),
    ("1\n2\n3\n4\n5\n", r"needs at least 2 columns"),
    ("1,0\n2,0\n3,0\n4,0\n5,0\n", r"at least 2 classes; found only 1 class \(0\)"),
]


@pytest.mark.parametrize("text, problem", BAD_CSV)
def test_bad_csv(tmp_path, text, problem):
    path = write(tmp_path, "bad.csv", text)
    with pytest.raises(DataError, match=r"bad\.csv: .*" + problem):
        data.load_dataset(str(path))


def test_csv_float_labels_for_classification(tmp_path):
    path = write(tmp_path, "f.csv", "1,0.0\n2,1.0\n3,0.5\n4,1.0\n5,0.0\n")
    with pytest.raises(
        DataError, match=r"f\.csv: labels that do not fit .*0\.5 at line 3"
    ):
        data.load_dataset(str(path), task="classification")


def test_csv_unknown_target_column(tmp_path):
    path = write(tmp_path, "h.csv", CSV_HEADER)
    with pytest.raises(DataError, match=r"h\.csv: target column 'price' not found"):
        data.load_csv(path, target="price")
    with pytest.raises(DataError, match=r"h\.csv: target index 3 out of range"):
        data.load_csv(path, target=3)


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    x = np.empty((6, 2), dtype=object)
    x[:] = 1.0
    path = tmp_path / "obj.npz"
    np.savez(path, x=x, y=np.arange(6) % 2)
    with pytest.raises(DataError, match=r"obj\.npz: array 'x' is an object array"):
        data.load_dataset(str(path))


BAD_NPZ = [
    (
        {"x": np.zeros((10, 2)), "y": np.arange(9) % 2},
        r"mismatched rows: 'x' has 10 rows but 'y' has 9",
    ),
    ({"x": np.zeros(10), "y": np.arange(10) % 2}, r"'x' must be 2-D"),
    ({"x": np.zeros((10, 2))}, r"missing array 'y'"),
    ({"x": np.array([["a", "b"]] * 10), "y": np.arange(10) % 2}, r"must be numeric"),
    (
        {"x": np.where(np.eye(10, 2) > 0, np.nan, 0.0), "y": np.arange(10) % 2},
        r"NaN in array 'x' at x\[0, 0\]",
    ),
    (
        {"x": np.zeros((10, 2)), "y": np.r_[np.arange(9) % 2, np.inf]},
        r"infinite value in array 'y' at y\[9\]",
    ),
    ({"x": np.zeros((10, 2)), "y": np.ones(10)}, r"found only 1 class"),
    ({"x": np.zeros((3, 2)), "y": np.arange(3)}, r"too few rows"),
]


@pytest.mark.parametrize("arrays, problem", BAD_NPZ)
def test_bad_npz(tmp_path, arrays, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"bad\.npz: .*" + problem):
        data.load_dataset(str(path))


def test_npz_float_labels_for_classification(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, x=np.zeros((10, 2)), y=np.linspace(0, 1, 10))
    with pytest.raises(DataError, match=r"f\.npz: labels that do not fit.*y\[1\]"):
        data.load_dataset(str(path), task="classification")


def test_npz_that_is_not_an_archive(tmp_path):
    path = write(tmp_path, "junk.npz", "not a zip file")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz archive"):
        data.load_npz(path)
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(DataError, match=r"single\.npz: not an \.npz archive"):
        data.load_npz(tmp_path / "single.npz")


def test_npz_rejects_target_argument(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, x=np.zeros((10, 2)), y=np.arange(10) % 2)
    with pytest.raises(DataError, match=r"t\.npz: target=1 applies only to .csv"):
        data.load_arrays(str(path), target=1)
