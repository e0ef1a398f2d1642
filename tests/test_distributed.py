"""Several processes for real: 2 processes x 2 CPU devices under jax.distributed.

One launch of two worker processes (module fixture) does, in order:

1. ``fnnet train --coordinator ... --num-processes 2 --process-id I`` through
   the CLI, each process's standard error on a pseudo-terminal so that a
   progress bar would show;
2. ``fit(devices=None)`` over the 4 devices of both processes: 4 epochs
   straight, and 2 epochs then a resume to 4;
3. a long ``fit`` in which process 1 kills itself (SIGKILL) after epoch 2,
   so that process 0 must notice and stop.

Every file write of a worker (they all end in ``os.replace``) is logged, to
show that process 1 writes nothing. A 1-process 4-device run in another
subprocess, started at the same time, and a 1-device run here are the
references.
"""

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

import fnnet
from fnnet import distributed

HEARTBEAT = 5  # seconds; process 0 must stop within this plus slack

#: The run of every process: the same flags, run folder and data.
TRAIN = ["train", "--hidden", "8", "--epochs", "4", "--batch-size", "16"]
TRAIN += ["--lr", "0.05", "--keep-prob", "0.9", "--noise-std", "0.05"]
TRAIN += ["--dtype", "float64", "--patience", "0", "--quiet"]

#: The same run through the API, as the CLI builds it (defaults: seed 0,
#: adam, splits 0.15 / 0.2), so that both share their compiled functions.
PROBLEM = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import fnnet
    from fnnet import data as fdata
    from fnnet.train import TrainConfig

    def problem(csv):
        ds = fdata.load_dataset(csv, val_fraction=0.15, test_fraction=0.2, seed=0)
        net = fnnet.MLP((4, 8, 3), "relu", "softmax", "cross_entropy",
                        keep_prob=0.9)
        p = net.init(jax.random.key(0), jnp.float64)
        cfg = TrainConfig(epochs=4, batch_size=16, optimizer="adam",
                          learning_rate=0.05, noise_std=0.05, patience=None)
        return net, p, (ds.x_train, ds.y_train), (ds.x_val, ds.y_val), cfg
    """
)

WORKER = PROBLEM + textwrap.dedent(
    """
    import dataclasses, json, os, signal, sys, time
    from pathlib import Path
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    args, csv = json.loads(sys.argv[4]), str(out / "d.csv")
    writes = []
    real_replace = os.replace
    def logged_replace(src, dst, *a, **k):
        writes.append(str(dst))
        return real_replace(src, dst, *a, **k)
    os.replace = logged_replace  # every fnnet file write ends in os.replace

    from fnnet import cli, distributed
    from fnnet.train import fit
    phases = [("imports", time.process_time())]
    args.remove("--quiet")  # both on a terminal: only process 0 may draw a bar
    rc = cli.main([*args, "--data", csv, "--out", str(out / "run"),
                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                   "--process-id", str(pid), "--heartbeat-timeout", "5"])
    distributed.sync("cli run written")
    phases.append(("cli", time.process_time()))
    jax.config.update("jax_enable_x64", True)
    net, p, train, val, cfg = problem(csv)
    half = dataclasses.replace(cfg, epochs=2)
    fit(net, p, train, val, half, checkpoint=out / "part.npz")
    resumed = fit(net, p, train, val, cfg, checkpoint=out / "part.npz",
                  resume=True)
    phases.append(("fits", time.process_time()))
    try:  # DP-SGD's Poisson batches are not fed per process: refused
        fit(net, p, train, None, dataclasses.replace(cfg, dp_clip=1.0))
        dp_error = None
    except ValueError as err:
        dp_error = str(err)
    report = {"rc": rc, "processes": jax.process_count(),
              "devices": jax.device_count(), "writes": writes, "phases": phases,
              "resumed_history": resumed.history, "dp_error": dp_error}
    np.savez(out / f"resumed{pid}.npz",
             *[np.asarray(t) for t in jax.tree.leaves(resumed.params)])
    (out / f"report{pid}.json").write_text(json.dumps(report))

    def die(record):
        if pid == 1 and record["epoch"] == 2:
            (out / "died").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
    fit(net, p, train, val, dataclasses.replace(cfg, epochs=100000),
        on_epoch=die)
    print("not stopped", flush=True)
    """
)

#: The same run on one process: over 4 devices, and on one.
REFERENCE = textwrap.dedent(
    """
    import json, sys
    from fnnet import cli
    args, csv, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    assert cli.main([*args, "--data", csv, "--devices", "4", "--out", out + "4"]) == 0
    assert cli.main([*args, "--data", csv, "--out", out + "1"]) == 0
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


class _Terminal:
    """A pseudo-terminal for a child's standard error, read by a thread."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        # A terminal of 24 x 100 characters, as a user's would be.
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.chunks = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the child side closed
                return
            if not data:
                return
            self.chunks.append(data)

    def text(self) -> str:
        self.thread.join(timeout=5)
        return b"".join(self.chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiprocess")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, 4))
    label = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8)
    rows = ["a,b,c,d,label"] + [
        ",".join([*(f"{v:.6f}" for v in row), str(k)])
        for row, k in zip(x, label, strict=True)
    ]
    (out / "d.csv").write_text("\n".join(rows) + "\n")
    ref, csv = out / "ref", out / "d.csv"
    reference = subprocess.Popen(
        [sys.executable, "-c", REFERENCE, json.dumps(TRAIN), str(csv), str(ref)],
        env=_env(4),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    port = _free_port()
    procs, terminals, ended = [], [], {}
    try:
        for pid in (0, 1):
            term = _Terminal()
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, str(port), str(pid), str(out)]
                    + [json.dumps(TRAIN)],
                    env=_env(2),
                    stdout=subprocess.PIPE,
                    stderr=term.slave,
                    text=True,
                )
            )
            os.close(term.slave)
            terminals.append(term)
        deadline = time.monotonic() + 240
        while len(ended) < 2 and time.monotonic() < deadline:
            for pid, proc in enumerate(procs):
                if pid not in ended and proc.poll() is not None:
                    ended[pid] = time.time()
            time.sleep(0.05)
        _, ref_err = reference.communicate(timeout=120)
    finally:
        for proc in (*procs, reference):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    stdout = [proc.stdout.read() for proc in procs]
    stderr = [term.text() for term in terminals]
    for pid in (0, 1):  # kept for a failing test's reader
        (out / f"stderr{pid}.txt").write_text(stderr[pid])
    assert reference.returncode == 0, ref_err[-3000:]
    return {
        "out": out,
        "ref": ref,
        "rc": [proc.returncode for proc in procs],
        "ended": ended,
        "stdout": stdout,
        "stderr": stderr,
    }


def _report(launched, pid):
    path = launched["out"] / f"report{pid}.json"
    assert path.exists(), launched["stderr"][pid][-4000:]
    return json.loads(path.read_text())


def _params(path):
    return [np.asarray(t) for t in jax.tree.leaves(fnnet.load_run(path).params)]


def test_two_processes_equal_four_devices_and_one_device(launched):
    """Params after 4 epochs: 2 x 2 devices == 1 x 4 devices == 1 device."""
    report = _report(launched, 0)
    assert report["processes"] == 2 and report["devices"] == 4
    out = launched["out"]
    two = _params(out / "run")
    four, one = _params(f"{launched['ref']}4"), _params(f"{launched['ref']}1")
    for u, v, w in zip(one, four, two, strict=True):
        assert u.dtype == np.float64
        np.testing.assert_allclose(w, u, rtol=0, atol=1e-12)
        np.testing.assert_allclose(w, v, rtol=0, atol=1e-12)
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 4
    # Stopped after 2 epochs and resumed through the API: the same parameters.
    for pid in (0, 1):
        resumed = list(np.load(out / f"resumed{pid}.npz").values())
        for r, w in zip(resumed, two, strict=True):
            np.testing.assert_allclose(r, w, rtol=0, atol=1e-12)
    assert [r["epoch"] for r in report["resumed_history"]] == [1, 2, 3, 4]
    assert "DP-SGD (config.dp_clip) runs in one process" in report["dp_error"]


def test_only_process_zero_writes_and_shows_progress(launched):
    r0, r1 = _report(launched, 0), _report(launched, 1)
    assert r0["rc"] == 0 and r1["rc"] == 0
    run = launched["out"] / "run"
    written = {os.path.basename(w) for w in r0["writes"]}
    expected = {"config.json", "checkpoint.npz", "metrics.json", "history.csv"}
    assert expected <= written
    assert "part.npz" in written
    assert r1["writes"] == []  # process 1 wrote no file at all
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["device"] == "cpu x4" and metrics["processes"] == 2
    assert "coordinator" not in json.loads((run / "config.json").read_text())
    # tqdm draws its bar ("4/4 [...epoch/s]") on process 0's terminal only.
    assert "4/4" in launched["stderr"][0] and "epoch/s" in launched["stderr"][0]
    assert "epoch/s" not in launched["stderr"][1]
    assert "4/4" not in launched["stderr"][1]
    # Only process 0 prints the summary line.
    assert "test_accuracy=" in launched["stdout"][0]
    assert "test_accuracy=" not in launched["stdout"][1]


def test_a_dead_process_stops_the_other(launched):
    died_file = launched["out"] / "died"
    assert died_file.exists(), launched["stderr"][1][-3000:]
    assert launched["rc"][1] == -signal.SIGKILL
    rc0 = launched["rc"][0]
    assert rc0 != 0, launched["stdout"][0]
    assert "not stopped" not in launched["stdout"][0]
    waited = launched["ended"][0] - float(died_file.read_text())
    assert waited < HEARTBEAT + 30, waited
    err = launched["stderr"][0]
    assert "another task died" in err or "unhealthy" in err, err[-3000:]


def test_initialize_checks_its_arguments_before_starting_jax():
    with pytest.raises(ValueError, match="missing: process_id"):
        distributed.initialize("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match="below num_processes=2, got 2"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="heartbeat_timeout must be an int >= 1"):
        distributed.initialize("127.0.0.1:1234", 2, 0, heartbeat_timeout=0)
    assert distributed.is_primary() and jax.process_count() == 1


def test_cluster_launch_needs_a_multi_task_launcher(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_")):
            monkeypatch.delenv(name)
    assert not distributed.cluster_launch()
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]"}
    slurm |= {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert not distributed.cluster_launch()  # one task: a plain run
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.cluster_launch()


def test_cli_process_flags_speak_the_flags_language(capsys):
    from fnnet import cli

    cases = [
        (["--coordinator", "127.0.0.1:1234"], "needs --num-processes and --process-id"),
        (
            ["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
            "--coordinator must be HOST:PORT",
        ),
        (
            ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id must be below --num-processes 2, got 2",
        ),
    ]
    for flags, message in cases:
        assert cli.main(["train", *flags]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--num-processes", "0"])
    assert exit_info.value.code == 2
    assert "--num-processes: must be a positive int" in capsys.readouterr().err
    assert jax.process_count() == 1  # nothing was started
