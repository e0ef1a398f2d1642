"""Checkpoints: lossless round trip, atomic writes, clear errors, no pickle."""

import ast
import functools
import io
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fnnet import checkpoint
from fnnet.checkpoint import CheckpointError

SIZES = (3, 5, 4, 2)


def make_params(seed, sizes=SIZES, dtype=jnp.float32):
    """fnnet-style params: one {"W": (out, in), "b": (out,)} dict per layer.

    Drawn with numpy: eager jax.random would compile a kernel per shape.
    """
    rng = np.random.default_rng(seed)
    return tuple(
        {
            "W": jnp.asarray(rng.standard_normal((m_out, m_in)), dtype),
            "b": jnp.full((m_out,), 0.1, dtype),
        }
        for m_in, m_out in zip(sizes[:-1], sizes[1:], strict=True)
    )


def adam():
    return optax.adam(1e-3)


def sgd_momentum():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))


def stepped(opt, params, n=3):
    """Optimizer state after n updates with fake gradients, so mu/nu/count != 0."""
    state = opt.init(params)
    for i in range(n):
        grads = jax.tree.map(lambda p, i=i: jnp.full_like(p, 0.5 + i), params)
        updates, state = optax_update(opt, grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def optax_update(opt, grads, state, params):
    # optax mixes Python floats and int32 counts (bias correction), which the
    # session's strict dtype promotion rejects; that is optax's business.
    # One jitted update compiles once; eager optax would compile op by op.
    with jax.numpy_dtype_promotion("standard"):
        return jax.jit(opt.update)(grads, state, params)


@functools.cache  # the leaves are immutable; tests never mutate the containers
def make_state(seed):
    p32, adam_state = stepped(adam(), make_params(seed, dtype=jnp.float32))
    p64, sgd_state = stepped(sgd_momentum(), make_params(seed, dtype=jnp.float64))
    return {
        "params32": p32,
        "adam": adam_state,
        "params64": p64,
        "sgd": sgd_state,
        "epoch": 7 if seed else 0,
        "key": jax.random.key(3 + seed),
        "legacy_key": jax.random.PRNGKey(3 + seed),
        "unused": None,
    }


META = {
    "config": {"sizes": list(SIZES), "activation": "relu", "lr": 1e-3},
    "epoch": 7,
    "history": {"loss": [0.9, 0.5, float("nan")], "acc": [0.1, 0.7, 0.75]},
}


def is_key(x):
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def leaf_bits(x):
    """(dtype, shape, raw bytes) of a leaf; typed keys by their key data."""
    if is_key(x):
        return ("key", str(jax.random.key_impl(x)), leaf_bits(jax.random.key_data(x)))
    a = np.asarray(x)
    return (a.dtype, a.shape, a.tobytes())


def assert_bit_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert type(g) is type(w) or isinstance(g, jax.Array)
        assert leaf_bits(g) == leaf_bits(w)
        if not is_key(w):
            assert np.array_equal(np.asarray(g), np.asarray(w), equal_nan=True)


@pytest.fixture
def ckpt(tmp_path):
    """A good checkpoint of make_state(1), and its state."""
    path = tmp_path / "run" / "ckpt.npz"
    state = make_state(1)
    checkpoint.save(path, state, META)
    return path, state


# --- round trip ---------------------------------------------------------------


def test_round_trip_realistic_state(ckpt):
    path, state = ckpt
    template = make_state(0)  # same structure, different values
    loaded, meta = checkpoint.load(path, template)

    assert_bit_identical(loaded, state)
    assert loaded["epoch"] == 7 and type(loaded["epoch"]) is int
    assert loaded["unused"] is None
    assert type(loaded["adam"]) is type(state["adam"])  # NamedTuples rebuilt
    assert loaded["params32"][0]["W"].dtype == jnp.float32
    assert loaded["params64"][0]["W"].dtype == jnp.float64
    # The keys still draw the same numbers, typed and legacy alike.
    for name in ("key", "legacy_key"):
        want = jax.random.normal(state[name], (6,))
        got = jax.random.normal(loaded[name], (6,))
        assert np.array_equal(got, want)
    assert jax.dtypes.issubdtype(loaded["key"].dtype, jax.dtypes.prng_key)
    assert loaded["legacy_key"].dtype == jnp.uint32
    # meta through JSON (NaN included); load_meta needs no template.
    assert meta["config"] == META["config"]
    assert meta["history"]["loss"][:2] == [0.9, 0.5]
    assert np.isnan(meta["history"]["loss"][2])
    assert json_equal(checkpoint.load_meta(path), meta)


def json_equal(a, b):
    return repr(a) == repr(b)  # NaN != NaN, but its repr is stable


def test_loaded_state_resumes_training(ckpt):
    """An optimizer step from the loaded state equals one from the saved state."""
    path, state = ckpt
    loaded, _ = checkpoint.load(path, make_state(0))
    opt = adam()
    grads = jax.tree.map(jnp.ones_like, state["params32"])
    want, _ = optax_update(opt, grads, state["adam"], state["params32"])
    got, _ = optax_update(opt, grads, loaded["adam"], loaded["params32"])
    assert_bit_identical(got, want)


def test_special_values_and_dtypes_bit_exact(tmp_path):
    nan_payload = np.array([0x7FF8DEADBEEF0001], np.uint64).view(np.float64)
    tree = {
        "f64": np.concatenate(
            [nan_payload, [-0.0, np.inf, -np.inf, 5e-324, np.finfo(np.float64).max]]
        ),
        "f32": jnp.array([-0.0, np.nan, 1e-45], jnp.float32),
        "bf16": jnp.array([1.5, -2.0, np.inf], jnp.bfloat16),
        "f16": np.array([65504.0], np.float16),
        "i8": np.array([-128, 127], np.int8),
        "u64": np.array([2**64 - 1], np.uint64),
        "bool": jnp.array([True, False]),
        "c128": np.array([1 + 2j]),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 3), np.float32),
        "flag": True,
        "lr": 0.001,
        "big_endian": np.array([1.0, 2.0], ">f4"),
        "rbg_key": jax.random.key(0, impl="rbg"),
        "keys": jax.random.split(jax.random.key(5), 3),
    }
    path = checkpoint.save(tmp_path / "x.npz", tree)
    loaded, meta = checkpoint.load(path, tree)
    assert meta == {}
    native = dict(tree, big_endian=np.array([1.0, 2.0], "<f4"))
    assert_bit_identical(loaded, native)
    assert loaded["bf16"].dtype == jnp.bfloat16
    assert type(loaded["flag"]) is bool and type(loaded["lr"]) is float
    assert np.array_equal(
        jax.random.bits(loaded["rbg_key"]), jax.random.bits(tree["rbg_key"])
    )


@pytest.mark.parametrize(
    "tree", [jnp.arange(3.0), (), {"a": None}], ids=["root_leaf", "empty", "none"]
)
def test_degenerate_trees(tmp_path, tree):
    path = checkpoint.save(tmp_path / "x.npz", tree, {"n": 1})
    loaded, meta = checkpoint.load(path, tree)
    assert_bit_identical(loaded, tree)
    assert meta == {"n": 1}


def test_shape_dtype_struct_template(ckpt):
    """A jax.eval_shape template works: nothing needs to be allocated first."""
    path, state = ckpt
    template = jax.eval_shape(lambda: make_state(0))
    loaded, _ = checkpoint.load(path, template)
    assert_bit_identical(loaded, state)


def test_save_details(tmp_path):
    path = tmp_path / "a" / "b" / "ckpt"  # parents created, no ".npz" appended
    out = checkpoint.save(str(path), {"x": jnp.ones(2)}, {"loss": np.float32(0.25)})
    assert out == path and isinstance(out, pathlib.Path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]
    assert checkpoint.load_meta(path) == {"loss": 0.25}  # 0-d numbers -> floats
    reference = tmp_path / "made_by_open"
    reference.write_bytes(b"")  # the mode an ordinary open() gives a new file
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
    # Overwrite keeps working and replaces the contents.
    checkpoint.save(path, {"x": jnp.zeros(2)})
    loaded, _ = checkpoint.load(path, {"x": jnp.ones(2)})
    assert np.array_equal(loaded["x"], np.zeros(2))


@pytest.mark.parametrize(
    "tree, meta, match",
    [
        ({"s": np.array(["a"])}, None, r"leaf \['s'\] has dtype <U1"),
        ({"o": np.array([object()])}, None, r"leaf \['o'\] has dtype object"),
        ({"x": jnp.ones(1)}, {"bad": object()}, "meta must be JSON-serializable"),
        ({"x": jnp.ones(1)}, {"arr": np.ones(2)}, r"\.tolist\(\)"),
        ({"x": jnp.ones(1)}, [1, 2], "meta must be a dict"),
    ],
)
def test_save_rejects_bad_input_before_touching_files(tmp_path, tree, meta, match):
    with pytest.raises(TypeError, match=match):
        checkpoint.save(tmp_path / "x.npz", tree, meta)
    assert list(tmp_path.iterdir()) == []


# --- atomicity ----------------------------------------------------------------


def dir_names(path):
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_replace_keeps_old_checkpoint(ckpt, monkeypatch, exc):
    path, state = ckpt
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise exc

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(type(exc)):
        checkpoint.save(path, make_state(2), {"epoch": 8})
    assert path.read_bytes() == before
    assert dir_names(path) == ["ckpt.npz"]  # no temporary file left
    loaded, meta = checkpoint.load(path, make_state(0))
    assert_bit_identical(loaded, state)
    assert meta["epoch"] == 7


def test_writer_dying_halfway_keeps_old_checkpoint(ckpt, monkeypatch):
    """A write that dies after some bytes never reaches the target path."""
    path, state = ckpt
    before = path.read_bytes()
    real_savez = np.savez

    def half_savez(file, *args, **kwargs):
        buf = io.BytesIO()
        real_savez(buf, *args, **kwargs)
        file.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("killed halfway")

    monkeypatch.setattr(np, "savez", half_savez)
    with pytest.raises(OSError, match="killed halfway"):
        checkpoint.save(path, make_state(2))
    assert path.read_bytes() == before
    assert dir_names(path) == ["ckpt.npz"]
    loaded, _ = checkpoint.load(path, make_state(0))
    assert_bit_identical(loaded, state)


def test_target_only_ever_replaced_whole(ckpt, monkeypatch):
    """While a save runs, the target holds the old file; the new one arrives whole.

    The writer and the rename are spied on: during the write the target still
    loads as the old state, and what is renamed onto it is already a complete,
    fsynced checkpoint in the same directory.
    """
    path, old = ckpt
    new = make_state(2)
    seen, temps = [], []
    real_mkstemp = tempfile.mkstemp
    real_savez, real_replace, real_fsync = np.savez, os.replace, os.fsync

    def spy_mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        temps.append(pathlib.Path(name))
        return fd, name

    def spy_savez(file, *args, **kwargs):
        assert temps[-1].parent == path.parent and temps[-1] != path
        assert os.path.samestat(os.fstat(file.fileno()), temps[-1].stat())
        assert_bit_identical(checkpoint.load(path, new)[0], old)
        seen.append("write")
        return real_savez(file, *args, **kwargs)

    def spy_fsync(fd):
        seen.append("fsync")
        return real_fsync(fd)

    def spy_replace(src, dst):
        assert pathlib.Path(dst) == path
        assert pathlib.Path(src) == temps[-1]
        assert_bit_identical(checkpoint.load(path, new)[0], old)
        assert_bit_identical(checkpoint.load(src, new)[0], new)
        seen.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", spy_mkstemp)
    monkeypatch.setattr(np, "savez", spy_savez)
    monkeypatch.setattr(checkpoint.os, "fsync", spy_fsync)
    monkeypatch.setattr(checkpoint.os, "replace", spy_replace)
    checkpoint.save(path, new)
    assert seen[:3] == ["write", "fsync", "replace"]  # then the directory fsync
    assert_bit_identical(checkpoint.load(path, new)[0], new)
    assert dir_names(path) == ["ckpt.npz"]


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file_is_rejected(ckpt, keep):
    """What a kill would leave if the file were written in place."""
    path, _ = ckpt
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=str(path)):
        checkpoint.load(path, make_state(0))
    with pytest.raises(CheckpointError, match=str(path)):
        checkpoint.load_meta(path)


# --- corrupt and foreign files ------------------------------------------------


def rewrite(path, **changes):
    """Rewrites a checkpoint's members (value None deletes one)."""
    with np.load(path, allow_pickle=False) as npz:
        entries = {k: npz[k] for k in npz.files}
    for k, v in changes.items():
        if v is None:
            del entries[k]
        else:
            entries[k] = v
    with open(path, "wb") as f:
        np.savez(f, **entries)


def as_bytes(text):
    return np.frombuffer(text.encode(), np.uint8)


def corrupt_random(path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def corrupt_empty(path):
    path.write_bytes(b"")


def corrupt_flip_data_byte(path):
    # Flip a byte inside the stored W of layer 0; the zip CRC catches it.
    state = make_state(1)
    data = bytearray(path.read_bytes())
    i = data.find(np.asarray(state["params32"][0]["W"]).tobytes())
    assert i > 0
    data[i + 5] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_npy(path):
    with open(path, "wb") as f:
        np.save(f, np.ones(3))


def corrupt_foreign_npz(path):
    with open(path, "wb") as f:
        np.savez(f, weights=np.ones(3))


def corrupt_version(path):
    with np.load(path, allow_pickle=False) as npz:
        text = npz["__fnnet_header__"].tobytes().decode()
    rewrite(
        path, __fnnet_header__=as_bytes(text.replace('"version": 1', '"version": 99'))
    )


def corrupt_meta_json(path):
    rewrite(path, __fnnet_meta__=as_bytes('{"epoch": 7,'))


def corrupt_meta_not_object(path):
    rewrite(path, __fnnet_meta__=as_bytes("[1, 2]"))


def corrupt_header_json(path):
    rewrite(path, __fnnet_header__=np.array([0xFF, 0xFE], np.uint8))


def corrupt_drop_leaf_keep_header(path):
    rewrite(path, **{"['params32'][0]['W']": None})


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (corrupt_random, "not a readable .npz"),
        (corrupt_empty, "not a readable .npz"),
        (corrupt_flip_data_byte, "CRC"),
        (corrupt_npy, "single .npy array"),
        (corrupt_foreign_npz, "not an fnnet checkpoint"),
        (
            corrupt_version,
            r"unknown format version 99; this fnnet reads versions \[1\]",
        ),
        (corrupt_meta_json, "meta is not valid UTF-8 JSON"),
        (corrupt_meta_not_object, "meta is a JSON list"),
        (corrupt_header_json, "header is not valid UTF-8 JSON"),
        (corrupt_drop_leaf_keep_header, r"header and archive disagree"),
    ],
)
def test_corrupt_file_is_rejected(ckpt, corrupt, match):
    path, _ = ckpt
    corrupt(path)
    with pytest.raises(CheckpointError, match=match) as info:
        checkpoint.load(path, make_state(0))
    assert str(path) in str(info.value)
    if corrupt is not corrupt_flip_data_byte:  # meta itself is intact there
        with pytest.raises(CheckpointError, match=str(path)):
            checkpoint.load_meta(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(CheckpointError, match=f"{path}: no such file"):
        checkpoint.load(path, make_state(0))
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.load_meta(path)
    assert issubclass(CheckpointError, ValueError)


# --- mismatched templates ------------------------------------------------------


def test_different_layer_count(tmp_path):
    path = tmp_path / "p.npz"
    checkpoint.save(path, make_params(0, (3, 5, 2)))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, make_params(0, (3, 5, 4, 2)))
    msg = str(info.value)
    assert str(path) in msg
    assert "template leaves missing from the file: [\"[2]['W']\", \"[2]['b']\"]" in msg
    # The other way round: a file with more layers than the template.
    path = tmp_path / "q.npz"
    checkpoint.save(path, make_params(0, (3, 5, 4, 2)))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, make_params(0, (3, 5, 2)))
    assert "file leaves not in the template: " in str(info.value)


@pytest.mark.parametrize(
    "sizes, dtype, found",
    [
        ((3, 6, 4, 2), jnp.float32, "found shape (6, 3) dtype float32"),
        (SIZES, jnp.float64, "found shape (5, 3) dtype float64"),
    ],
    ids=["W_shape", "dtype"],
)
def test_leaf_mismatch_names_path_expected_found(tmp_path, sizes, dtype, found):
    path = tmp_path / "p.npz"
    checkpoint.save(path, make_params(0, sizes, dtype))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, make_params(0, SIZES, jnp.float32))
    msg = str(info.value)
    assert f"checkpoint {path}: leaf [0]['W']: " in msg
    assert "expected shape (5, 3) dtype float32" in msg and found in msg


def test_different_optimizer(tmp_path):
    params = make_params(0)
    path = tmp_path / "opt.npz"
    checkpoint.save(path, {"params": params, "opt": sgd_momentum().init(params)})
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, {"params": params, "opt": adam().init(params)})
    msg = str(info.value)
    assert "tree structure differs from the template" in msg
    assert ".mu" in msg and ".trace" in msg  # adam's moments vs sgd's momentum


@pytest.mark.parametrize(
    "saved, template, match",
    [
        (jax.random.key(0), jax.random.PRNGKey(0), "expected an array .* typed PRNG"),
        (jax.random.PRNGKey(0), jax.random.key(0), "expected a typed PRNG key"),
        (
            jax.random.key(0, impl="rbg"),
            jax.random.key(0),
            "cannot rebuild a rbg key|expected shape",
        ),
        (
            jax.random.split(jax.random.key(0), 2),
            jax.random.key(0),
            r"expected shape \(\) dtype key<fry>, found shape \(2,\)",
        ),
    ],
    ids=["typed_vs_legacy", "legacy_vs_typed", "impl", "key_shape"],
)
def test_key_mismatch(tmp_path, saved, template, match):
    path = checkpoint.save(tmp_path / "k.npz", {"key": saved})
    with pytest.raises(CheckpointError, match=match) as info:
        checkpoint.load(path, {"key": template})
    assert "leaf ['key']" in str(info.value)


def test_float64_without_x64_is_refused_not_rounded(tmp_path):
    path = checkpoint.save(tmp_path / "x.npz", {"x": np.array([0.1])})
    with jax.enable_x64(False):
        with pytest.raises(CheckpointError, match="jax_enable_x64"):
            checkpoint.load(path, {"x": np.zeros(1)})


# --- no pickle -----------------------------------------------------------------

UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return "trap sprung"


PICKLED = []


class Trap:
    """Unpickling a Trap calls _record_unpickling; pickling one is recorded."""

    def __reduce__(self):
        PICKLED.append(True)
        return (_record_unpickling, ())


def _entries(path):
    with np.load(path, allow_pickle=False) as npz:
        return list(npz.files)


@pytest.mark.parametrize("which", ["leaf", "header", "meta"])
def test_object_array_is_rejected_and_never_unpickled(ckpt, which):
    path, _ = ckpt
    names = _entries(path)
    # The leaves are named by key path ("['params32'][0]['W']"); the two other
    # entries are the JSON header and the user's metadata, header first read.
    extra = sorted(n for n in names if not n.startswith("["))
    assert len(extra) == 2, names
    entry = {
        "leaf": "['params32'][0]['W']",
        "header": next(n for n in extra if "head" in n),
        "meta": next(n for n in extra if "head" not in n),
    }[which]
    UNPICKLED.clear()
    rewrite(path, **{entry: np.array([Trap()], dtype=object)})
    with pytest.raises(CheckpointError, match="cannot read entry .*Object arrays"):
        if which == "meta":
            checkpoint.load_meta(path)
        else:
            checkpoint.load(path, make_state(0))
    assert UNPICKLED == []
    # The trap is live: a pickle-allowing reader would have run it.
    with np.load(path, allow_pickle=True) as npz:
        npz[entry]
    assert UNPICKLED == [True]


def test_module_never_imports_pickle():
    source = pathlib.Path(checkpoint.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
            imported |= {a.name for a in node.names}
    assert not {"pickle", "cPickle", "dill", "cloudpickle"} & imported


@pytest.mark.parametrize("leaf", [np.array([Trap()], dtype=object), Trap()])
def test_save_never_pickles_and_writes_nothing(tmp_path, leaf):
    path = tmp_path / "ckpt.npz"
    PICKLED.clear()
    with pytest.raises((TypeError, ValueError)):
        checkpoint.save(path, {"W": np.zeros(2), "bad": leaf})
    assert PICKLED == []
    assert list(tmp_path.iterdir()) == []


# --- property -------------------------------------------------------------------

DTYPES = [np.float32, np.float64, np.int32, np.uint8, np.bool_, jnp.bfloat16]


@st.composite
def trees(draw):
    n_layers = draw(st.integers(0, 3))
    layers = []
    for _ in range(n_layers):
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**32 - 1))
        raw = np.random.default_rng(seed).bytes(
            int(np.prod(shape)) * np.dtype(dtype).itemsize
        )
        arr = np.frombuffer(raw, np.uint8).view(np.dtype(dtype)).reshape(shape)
        if dtype is np.bool_:
            arr = arr.view(np.uint8) > 127
        layers.append({"W": arr, "opt": (arr, None, [arr])})
    return {"layers": layers, "step": draw(st.integers(0, 10**6))}


@given(trees())
def test_round_trip_property(tree):
    """Random shapes, dtypes and bit patterns (NaNs, subnormals) round-trip."""
    with tempfile.TemporaryDirectory() as d:
        path = checkpoint.save(os.path.join(d, "t.npz"), tree, {"k": [1, "x"]})
        loaded, meta = checkpoint.load(path, tree)
    assert_bit_identical(loaded, tree)
    assert meta == {"k": [1, "x"]}
