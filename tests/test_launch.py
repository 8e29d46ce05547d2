"""launch/distad-run (flags per MPI flavour, environment, oversubscription), the shell scripts'
hygiene, and the `distad bench scaling` driver that launches through it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distad.bench import scaling

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
RUN = LAUNCH / "distad-run"
SCRIPTS = ["distad-run", "emulated-cluster", "sweep-progress-settings", "compression-study",
           "distad.sbatch", "sweep-scaling"]


def distad_run(*args: str, env: dict[str, str], check: bool = False
               ) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUN), *args], env=env, capture_output=True, text=True,
                          timeout=120, check=check)


def fake_mpiexec(tmp_path: Path, version_text: str, name: str = "mpiexec") -> Path:
    """An executable that answers --version like a given MPI's launcher."""
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{version_text}\nEOF\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_scripts_exist_and_parse(script):
    path = LAUNCH / script
    assert path.exists(), f"launch/{script} is missing"
    subprocess.run(["bash", "-n", str(path)], check=True)
    if script != "distad.sbatch":
        assert os.access(path, os.X_OK), f"launch/{script} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_launch_scripts_are_shellcheck_clean():
    res = subprocess.run(["shellcheck", *[str(LAUNCH / s) for s in SCRIPTS]],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_help_describes_the_options(launch_env):
    res = distad_run("--help", env=launch_env, check=True)
    for flag in ("--np", "--hostfile", "--bind", "--env", "--launcher", "--dry-run", "--restarts"):
        assert flag in res.stdout


def test_without_a_command_it_says_how_to_call_it(launch_env):
    res = distad_run("-n", "2", env=launch_env)
    assert res.returncode == 2 and "no command to run" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["-n", "two", "true"], "positive integers"),
    (["--bind", "numa", "true"], "--bind must be"),
    (["--frobnicate", "true"], "unknown option '--frobnicate'"),
    (["-H", "a", "-f", "/dev/null", "true"], "not both"),
])
def test_bad_options_fail_with_a_clear_message(launch_env, args, message):
    res = distad_run(*args, env=launch_env)
    assert res.returncode == 2 and message in res.stderr


def test_mpich_dry_run_passes_the_environment_to_every_rank(launch_env):
    env = {**launch_env, "MY_SETTING": "from-shell"}
    res = distad_run("-n", "3", "-x", "A=1", "-x", "MY_SETTING", "--bind", "core", "--dry-run",
                     "distad", "train", env=env, check=True)
    words = shlex.split(res.stdout)
    assert words[1:3] == ["-n", "3"]
    assert "MPICH" in res.stderr and "(hydra)" in res.stderr
    joined = " ".join(words)
    for part in ("-genv A 1", "-genv MY_SETTING from-shell", "-genv OMP_NUM_THREADS 1",
                 "-bind-to core"):
        assert part in joined
    assert words[-2:] == ["distad", "train"]


def test_mpich_hostfile_formats_are_normalised(launch_env, tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("# two formats\nnode1:2\nnode2 slots=4\nnode3\n")
    res = distad_run("-n", "4", "-f", str(hf), "--ppn", "2", "--dry-run", "true",
                     env=launch_env, check=True)
    assert "-ppn 2" in res.stdout and " -f " in res.stdout
    listed = [ln.split(": ")[-1] for ln in res.stderr.splitlines() if "hostfile" in ln]
    assert listed == ["node1:2", "node2:4", "node3"]


def test_open_mpi_gets_its_own_flags_and_oversubscribe(launch_env, tmp_path):
    mpiexec = fake_mpiexec(tmp_path, "mpiexec (Open MPI) 5.0.5\n\nReport bugs to ...")
    cores = os.cpu_count() or 1
    res = distad_run("--mpiexec", str(mpiexec), "-n", str(cores + 2), "-H", "localhost",
                     "-x", "A=1", "--dry-run", "true", env=launch_env, check=True)
    out = res.stdout
    assert "--oversubscribe" in out and "-x A=1" in out and "--hostfile" in out
    assert "--bind-to none" in out
    assert "oversubscribed" in res.stderr
    if os.geteuid() == 0:
        assert "-x OMPI_ALLOW_RUN_AS_ROOT=1" in out


def test_open_mpi_on_remote_hosts_is_not_called_oversubscribed(launch_env, tmp_path):
    mpiexec = fake_mpiexec(tmp_path, "mpiexec (Open MPI) 5.0.5")
    res = distad_run("--mpiexec", str(mpiexec), "-n", "64", "-H", "node1:32,node2:32",
                     "--dry-run", "true", env=launch_env, check=True)
    assert "--oversubscribe" not in res.stdout


def test_intel_mpi_pins_through_its_variables(launch_env, tmp_path):
    mpiexec = fake_mpiexec(tmp_path, "Intel(R) MPI Library for Linux* OS, Version 2021.13")
    res = distad_run("--mpiexec", str(mpiexec), "-n", "2", "--bind", "core", "--dry-run", "true",
                     env=launch_env, check=True)
    assert "-genv I_MPI_PIN 1" in res.stdout and "-genv I_MPI_PIN_DOMAIN core" in res.stdout


def test_inside_slurm_it_uses_srun(launch_env, tmp_path):
    fake_mpiexec(tmp_path, "slurm 23.11.4", name="srun")
    env = {**launch_env, "PATH": f"{tmp_path}:{launch_env['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_NTASKS": "8"}
    res = distad_run("-x", "A=1", "--bind", "core", "--dry-run", "distad", "train",
                     env=env, check=True)
    words = shlex.split(res.stdout)
    assert words[:3] == ["srun", "--ntasks", "8"]
    assert "--cpu-bind=cores" in words
    assert any(w.startswith("--export=ALL,A=1,") for w in words)


def test_an_unknown_launcher_is_refused(launch_env, tmp_path):
    mpiexec = fake_mpiexec(tmp_path, "some other launcher 1.0")
    res = distad_run("--mpiexec", str(mpiexec), "true", env=launch_env)
    assert res.returncode == 2 and "cannot tell which MPI" in res.stderr


def test_a_real_two_rank_job_sees_the_environment(launch_env, mpiexec):
    code = ("import os; from mpi4py import MPI; c = MPI.COMM_WORLD; "
            "print(f'<{c.rank} {c.size} {os.environ[\"DISTAD_TEST_VAR\"]} "
            "{os.environ[\"OMP_NUM_THREADS\"]}>')")
    res = distad_run("--mpiexec", str(mpiexec), "-n", "2", "-x", "DISTAD_TEST_VAR=yes",
                     sys.executable, "-c", code, env=launch_env, check=True)
    assert sorted(re.findall(r"<([^>]*)>", res.stdout)) == ["0 2 yes 1", "1 2 yes 1"]
    assert "distad-run: launcher mpiexec, MPICH" in res.stderr


def test_restarts_go_on_from_the_newest_checkpoint_to_the_uninterrupted_result(
        launch_env, mpiexec, tmp_path):
    """A job killed right after its checkpoint of step 28 is started again with --resume and
    ends where the uninterrupted run does, bit for bit."""
    train = [sys.executable, "-m", "distad", "train", "--no-progress", "--epochs", "2",
             "--batch-size", "16", "--hidden", "32", "--checkpoint-every", "7"]
    full = distad_run("--mpiexec", str(mpiexec), "-n", "2", *train, "--out",
                      str(tmp_path / "full"), env=launch_env)
    assert full.returncode == 0, full.stderr
    res = distad_run("--mpiexec", str(mpiexec), "-n", "2", "--restarts", "2", *train,
                     "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "b"),
                     env=dict(launch_env, DISTAD_KILL_AT_STEP="28"))
    assert res.returncode == 0, res.stderr
    assert "restart 1 of 2 with --resume" in res.stderr and "restart 2" not in res.stderr
    from distad.train import load_state

    a = load_state(tmp_path / "full" / "model.npz")["model"]
    b = load_state(tmp_path / "b" / "model.npz")["model"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_restarts_need_a_command_that_checkpoints(launch_env):
    res = distad_run("--restarts", "1", "distad", "train", env=launch_env)
    assert res.returncode == 2 and "--restarts needs a command that checkpoints" in res.stderr


def test_example_hostfile_and_slurm_template_use_the_wrapper():
    assert (LAUNCH / "hostfile.example").read_text().strip()
    sbatch = (LAUNCH / "distad.sbatch").read_text()
    assert "#SBATCH" in sbatch and "distad-run" in sbatch


# ---- the scaling driver ---------------------------------------------------------------------

def records(step_times, accs_at):
    steps = [{"step": i + 1, "step_s": t, "wait_s": 0.0, "compress_s": 0.0,
              "decompress_s": 0.0, "communicate_s": 0.0, "bytes_sent": 0}
             for i, t in enumerate(step_times)]
    tests = [{"step": s, "test_acc": a} for s, a in accs_at]
    return steps, tests


def test_time_to_accuracy_sums_step_times_until_the_first_evaluation_at_target():
    steps, tests = records([1.0] * 10, [(5, 0.7), (10, 0.9)])
    assert scaling.time_to_accuracy(steps, tests, 0.7) == 5.0
    assert scaling.time_to_accuracy(steps, tests, 0.8) == 10.0
    assert scaling.time_to_accuracy(steps, tests, 0.95) == float("inf")


def test_calibrations_merge_to_the_fastest_of_every_timing():
    """Like a point's runs, repeated calibrations keep the fastest figure of each timing;
    counts, lists and names are the same in every run and come from the first."""
    a = {"forward_s": 0.010, "batch": 32, "bucket_elems": [3, 4],
         "compressors": {"topk": {"compress_s_per_elem": 2e-9, "strategies": ["allgather"]}}}
    b = {"forward_s": 0.008, "batch": 32, "bucket_elems": [3, 4],
         "compressors": {"topk": {"compress_s_per_elem": 3e-9, "strategies": ["allgather"]}}}
    merged = scaling.fastest_of([a, b])
    assert merged["forward_s"] == 0.008 and merged["batch"] == 32
    assert merged["compressors"]["topk"] == {"compress_s_per_elem": 2e-9,
                                             "strategies": ["allgather"]}
    assert scaling.typical([3.0, 1.0, 2.0, 10.0]) == 2.5


def test_time_to_accuracy_over_a_window_needs_the_mean_of_full_windows_at_target():
    """One lucky evaluation does not count: with a window of 2, the first full window is at
    step 4, and (0.9 + 0.6) / 2 = 0.75 < 0.8 there; steps 6 and 8 average 0.8."""
    steps, tests = records([1.0] * 8, [(2, 0.9), (4, 0.6), (6, 0.7), (8, 0.9)])
    assert scaling.time_to_accuracy(steps, tests, 0.8) == 2.0
    assert scaling.time_to_accuracy(steps, tests, 0.8, window=2) == 8.0
    assert scaling.smoothed_accuracy(tests, 2) == pytest.approx([0.9, 0.75, 0.65, 0.8])


def test_summary_drops_warmup_and_splits_the_step():
    steps, tests = records([9.0, 9.0, 9.0] + [0.1] * 10, [(13, 0.5)])
    for r in steps:
        r.update(wait_s=0.04, communicate_s=0.05, bytes_sent=1000)
    p = scaling.Point("weak", "shm", "none", 4, 32, 13)
    scaling.summarise(p, steps, tests, None)
    assert p.step_s == pytest.approx(0.1) and p.wait_s == pytest.approx(0.04)
    assert p.compute_s == pytest.approx(0.06)
    assert p.samples_per_s == pytest.approx(32 * 4 / 0.1)
    assert p.link_gbit_s == pytest.approx(1000 * 1.5 * 8 / 0.05 / 1e9)
    assert p.test_acc == 0.5


def test_model_fit_counts_multi_rank_points_within_the_tolerance_and_names_the_worst():
    def point(link, p, err):
        q = scaling.Point("weak", link, "none", p, 32, 10)
        q.pred_error = err
        return q

    pts = [point("shm", 1, 0.50), point("shm", 2, -0.10), point("1gbit", 4, 0.16),
           point("1gbit", 2, 0.02), point("shm", 4, float("nan"))]
    line = scaling.model_fit(pts)
    assert line.startswith("model: 2 of 3 multi-rank points within 15%")
    assert "mean |error| 9.3%" in line and "worst 1gbit none P=4 +16.0%" in line
    assert scaling.model_fit(pts[:1]) == "model: no multi-rank point to compare"


def test_predictions_cover_the_requested_ranks_and_rates():
    cal = {"forward_s": 0.01, "backward_s": 0.02, "update_s": 0.002, "batch": 32,
           "bucket_elems": [1000, 100000], "compressors": {}}
    rows = scaling.predictions(cal, ["none"], [64, 1024], [10, 100], alpha=20e-6)
    assert [(r["gbit_s"], r["ranks"]) for r in rows] == [(10, 64), (10, 1024), (100, 64),
                                                          (100, 1024)]
    assert all(0 < r["efficiency"] <= 1 for r in rows)


def test_calibrate_prints_the_one_rank_step_of_every_spec(capsys, tmp_path):
    """`--calibrate` times one rank's step per compressor and writes nothing to --out; the
    compressed step costs more than the plain one (its backward carries the compression)."""
    rc = scaling.main(["--calibrate", "--hidden", "64", "--features", "32", "--batch-size",
                       "4", "--compress", "none,topk:0.1+ef", "--out", str(tmp_path / "x")])
    assert rc == 0 and not (tmp_path / "x").exists()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["none", "topk:0.1+ef"]
    step = {r.split("|")[1].strip(): float(r.split("|")[5]) for r in rows[1:]}
    assert all(v > 0 for v in step.values())
    assert step["topk:0.1+ef"] > step["none"]


def test_calibration_times_the_optimizer_the_runs_get_from_train_args():
    """--train-args reach the calibration: with Adam and --zero it times a sharded Adam
    update (and says so, for the model), and the model then predicts a ZeRO step."""
    cfg = {"model": "mlp", "hidden": "64", "features": 32, "classes": 4, "samples": 256,
           "lr": 0.01, "seed": 0, "bucket_mb": 25.0, "first_bucket_mb": 1.0,
           "schedule": "none", "batch_size": 4, "train_extra": ["--optimizer", "adam", "--zero"]}
    cal = scaling.calibrate(cfg, ["none"], repeats=3)
    assert cal["optimizer"] == "adam" and cal["zero"] is True
    assert scaling.step_model(cal, "none").zero
    plain = scaling.calibrate({**cfg, "train_extra": []}, ["none"], repeats=3)
    assert plain["optimizer"] == "sgd" and plain["zero"] is False


@pytest.mark.slow
def test_a_small_sweep_writes_csv_json_and_plots(tmp_path, launch_env, monkeypatch):
    for k in list(os.environ):
        if k not in launch_env:
            monkeypatch.delenv(k)
    out = tmp_path / "sweep"
    rc = scaling.main(["--ranks", "1,2", "--hidden", "32", "--features", "16", "--samples",
                       "512", "--steps", "6", "--no-calibrate", "--wait-idle", "0",
                       "--out", str(out), "--predict-ranks", "64", "--predict-rates", "10",
                       "--calibrate-each"])
    assert rc == 0
    data = json.loads((out / "scaling.json").read_text())
    assert [p["ranks"] for p in data["points"]] == [1, 2]
    assert {p["extra"]["calibrated"] for p in data["points"]} == {"beside each run"}
    assert all((Path(p["run_dir"]) / "calibration.json").exists() for p in data["points"])
    assert all(p["step_s"] > 0 and p["pred_step_s"] > 0 for p in data["points"])
    assert (out / "scaling.csv").read_text().startswith("mode,link,compress,ranks")
    assert (out / "predictions.csv").exists()
    if shutil.which("true") and _has_matplotlib():
        assert (out / "scaling.png").exists() and (out / "breakdown.png").exists()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
