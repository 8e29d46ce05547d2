"""The training job and its checkpoints: atomic, verified, exact resume."""

import json
import math
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import distad as ad
from distad.train import CheckpointError, load_state, save_state
from distad.train.config import TrainConfig


def nested_state():
    return {"step": 12, "name": "run", "lr": 0.1, "none": None,
            "model": {"0.weight": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "optimizer": {"state": {0: {"momentum": np.ones(3, np.float32), "step": 4}},
                          "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "rng": (1, 2, 2**70)}


def test_checkpoint_round_trips_nested_state_with_types(tmp_path):
    save_state(tmp_path / "c.npz", nested_state())
    back = load_state(tmp_path / "c.npz")
    assert back["optimizer"]["state"][0]["step"] == 4          # int keys stay ints
    np.testing.assert_array_equal(back["model"]["0.weight"], nested_state()["model"]["0.weight"])
    assert back["model"]["0.weight"].dtype == np.float32
    assert back["rng"] == (1, 2, 2**70) and back["none"] is None


def test_checkpoint_refuses_objects_that_would_need_pickle(tmp_path):
    with pytest.raises(TypeError, match="cannot store.*never pickle"):
        save_state(tmp_path / "c.npz", {"f": object()})


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    p = tmp_path / "c.npz"
    save_state(p, nested_state())
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"c\.npz: unreadable \(truncated or corrupted\)"):
        load_state(p)


def test_tampered_checkpoint_gives_a_clear_error(tmp_path):
    p = tmp_path / "c.npz"
    state = nested_state()
    save_state(p, state)
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in arrays if k != "manifest" and arrays[k].dtype == np.float32)
    arrays[key] = arrays[key] + 1                                 # a consistent zip, wrong data
    np.savez(p, **arrays)
    with pytest.raises(CheckpointError, match="model/0.weight fails its SHA-256 check"):
        load_state(p)


def test_a_write_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path):
    p = tmp_path / "c.npz"
    save_state(p, {"version": 1, "w": np.zeros(1000)})
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        import distad.train.checkpoint as c
        def killed_before_rename(src, dst):
            os.kill(os.getpid(), signal.SIGKILL)     # the file is written, the rename never happens
        c.os.replace = killed_before_rename
        c.save_state({str(p)!r}, {{"version": 2, "w": np.ones(1000)}})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    back = load_state(p)
    assert back["version"] == 1 and not back["w"].any()


def test_one_process_training_learns_digits(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.2, out=str(tmp_path), progress=False)
    summary = ad.train.run(cfg)
    assert summary["test_acc"] > 0.9
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") > 3
    model = load_state(tmp_path / "model.npz")["model"]
    assert list(model) == ["1.weight", "1.bias", "3.weight", "3.bias"]


def test_one_process_training_with_batch_norm_learns_digits_and_saves_its_statistics(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.2, norm="batch", out=str(tmp_path), progress=False)
    summary = ad.train.run(cfg)
    assert summary["test_acc"] > 0.9
    model = load_state(tmp_path / "model.npz")["model"]
    assert list(model) == ["1.weight", "1.bias", "2.weight", "2.bias", "2.running_mean",
                           "2.running_var", "2.num_batches_tracked", "4.weight", "4.bias"]
    assert int(model["2.num_batches_tracked"]) == summary["steps"]
    assert model["2.running_var"].dtype == np.float32 and np.all(model["2.running_var"] > 0)


def _train(args, env, mpiexec=None, ranks=1, timeout=240):
    cmd = [sys.executable, "-m", "distad", "train", "--no-progress", *args]
    if mpiexec is not None:
        cmd = [str(mpiexec), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("ranks,spec,extra", [(1, "none", ()), (2, "none", ()),
                                              (2, "topk:0.05+ef", ()), (2, "powersgd:2+ef", ()),
                                              (2, "none", ("--norm", "batch")),
                                              (2, "none", ("--norm", "sync")),
                                              (4, "none", ("--parallel", "pp,tp",
                                                           "--microbatches", "2")),
                                              (4, "none", ("--parallel", "dp,tp",
                                                           "--norm", "sync")),
                                              (2, "none", ("--zero", "--optimizer", "adam")),
                                              (4, "none", ("--parallel", "dp,pp", "--zero",
                                                           "--optimizer", "adam",
                                                           "--microbatches", "2"))])
def test_killed_and_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(
        tmp_path, mpiexec, launch_env, ranks, spec, extra):
    """Compressed runs included: error-feedback residuals, PowerSGD's Q and the compressor's
    random streams are run state, checkpointed per rank; so are BatchNorm's running
    statistics (rank 0's, which every rank uses), each stage's shards of a pipeline of
    tensor-parallel stages, and the feature slices of a tensor-parallel SyncBatchNorm."""
    common = ["--epochs", "3", "--batch-size", "16", "--hidden", "32", "--checkpoint-every", "7",
              "--compress", spec, *extra]
    full = _train([*common, "--out", str(tmp_path / "full")], launch_env, mpiexec, ranks)
    assert full.returncode == 0, full.stderr
    ck = str(tmp_path / "ck")
    killed = _train([*common, "--checkpoint-dir", ck, "--out", str(tmp_path / "a")],
                    dict(launch_env, DISTAD_KILL_AT_STEP="30"), mpiexec, ranks)
    assert killed.returncode != 0
    assert not (tmp_path / "a" / "model.npz").exists()
    resumed = _train([*common, "--checkpoint-dir", ck, "--resume", "--out", str(tmp_path / "b")],
                     launch_env, mpiexec, ranks)
    assert resumed.returncode == 0, resumed.stderr
    a = load_state(tmp_path / "full" / "model.npz")["model"]
    b = load_state(tmp_path / "b" / "model.npz")["model"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_refuses_a_checkpoint_from_a_different_run(tmp_path, launch_env):
    ck = str(tmp_path / "ck")
    assert _train(["--epochs", "1", "--hidden", "16", "--checkpoint-dir", ck],
                  launch_env).returncode == 0
    r = _train(["--epochs", "2", "--hidden", "32", "--checkpoint-dir", ck, "--resume"], launch_env)
    assert r.returncode != 0
    assert "different run" in r.stderr and "hidden" in r.stderr


def test_cli_help_lists_the_commands():
    r = subprocess.run([sys.executable, "-m", "distad", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "bench engine" in r.stdout and "train" in r.stdout


def test_trace_has_compute_wait_and_communication_spans_per_rank(tmp_path, mpiexec, launch_env):
    import json

    trace = tmp_path / "trace.json"
    r = _train(["--epochs", "1", "--hidden", "16", "--trace", str(trace)], launch_env, mpiexec, 2)
    assert r.returncode == 0, r.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    steps = {e["args"]["step"] for e in spans}
    for rank in (0, 1):
        names = {e["name"] for e in spans if e["pid"] == rank}
        assert {"compute", "wait", "communicate"} <= names
    assert all(e["dur"] >= 0 for e in spans) and len(steps) > 10


def test_eval_every_records_test_accuracy_between_epochs(tmp_path):
    import json

    cfg = TrainConfig(epochs=1, eval_every=10, out=str(tmp_path), progress=False)
    ad.train.run(cfg)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "test_acc" in r]
    assert [r["step"] for r in evals][:4] == [10, 20, 30, 40]
    assert all(r["elapsed_s"] > 0 for r in evals)


@pytest.mark.parametrize("spec,ranks,expected", [
    ("pp", 4, (1, 4, 1)), ("dp,pp", 8, (4, 2, 1)), ("dp=2,pp", 8, (2, 4, 1)),
    ("dp,tp", 4, (2, 1, 2)), ("pp,tp", 4, (1, 2, 2)), ("tp,pp", 8, (1, 4, 2)),
    ("dp,pp,tp", 8, (2, 2, 2)), ("dp=1,pp=2,tp=4", 8, (1, 2, 4))])
def test_parallel_spec_sizes(spec, ranks, expected):
    from distad.train.model_parallel import parse_parallel

    sizes = parse_parallel(spec, ranks)
    assert (sizes["dp"], sizes["pp"], sizes["tp"]) == expected


@pytest.mark.parametrize("spec,ranks,message", [
    ("pp,pp", 4, "each at most once"), ("xp", 4, "subset of dp, pp, tp"),
    ("pp=0", 4, "positive integer"), ("pp=3,tp", 4, "pp=3 x tp=1 = 3 ranks, but the job has 4")])
def test_parallel_spec_errors_name_the_problem(spec, ranks, message):
    from distad.train.model_parallel import parse_parallel

    with pytest.raises(ValueError, match=message):
        parse_parallel(spec, ranks)


def test_batch_norm_with_a_pipeline_is_refused_with_the_reason():
    from distad.train.config import from_args, parser

    with pytest.raises(SystemExit, match="micro-batches"):
        from_args(parser().parse_args(["--parallel", "pp", "--norm", "batch"]))
    cfg = from_args(parser().parse_args(["--parallel", "dp,tp", "--norm", "sync"]))
    assert cfg.norm == "sync"


@pytest.mark.parametrize("ranks", [1, 2])
def test_accumulating_micro_batches_gives_the_same_run(tmp_path, mpiexec, launch_env, ranks):
    """--accumulate 4 cuts each rank's batch of 16 into 4 micro-batches and synchronises once
    per step: the same model as one backward per batch, to float32 rounding."""
    common = ["--epochs", "2", "--batch-size", "16", "--hidden", "32", "--schedule", "none"]
    runs = {}
    for acc in (1, 4):
        out = tmp_path / f"acc{acc}"
        r = _train([*common, "--accumulate", str(acc), "--out", str(out)], launch_env,
                   mpiexec if ranks > 1 else None, ranks)
        assert r.returncode == 0, r.stderr
        runs[acc] = load_state(out / "model.npz")["model"]
    for k in runs[1]:
        np.testing.assert_allclose(runs[4][k], runs[1][k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_accumulate_is_refused_with_model_parallelism():
    from distad.train.config import from_args, parser

    with pytest.raises(SystemExit, match="--accumulate"):
        from_args(parser().parse_args(["--parallel", "pp", "--accumulate", "2"]))


def test_grad_error_every_is_refused_with_model_parallelism():
    from distad.train.config import from_args, parser

    with pytest.raises(SystemExit, match="--grad-error-every"):
        from_args(parser().parse_args(["--parallel", "dp,pp", "--grad-error-every", "5"]))
    with pytest.raises(SystemExit, match="with --zero and no --compress"):
        from_args(parser().parse_args(["--zero", "--grad-error-every", "5"]))
    assert from_args(parser().parse_args(["--zero", "--grad-error-every", "5", "--compress",
                                          "fp16"])).zero
    assert from_args(parser().parse_args(["--grad-error-every", "5"])).grad_error_every == 5


def test_zero_is_refused_without_data_parallel_replicas_or_with_lbfgs():
    from distad.train.config import from_args, parser

    for args in (["--parallel", "pp,tp"], ["--optimizer", "lbfgs"]):
        with pytest.raises(SystemExit, match="--zero shards over the data-parallel replicas"):
            from_args(parser().parse_args(["--zero", *args]))
    assert from_args(parser().parse_args(["--zero", "--parallel", "dp,pp"])).zero


def test_zero_sharded_optimizer_state_gives_the_same_run_bit_for_bit(tmp_path, mpiexec,
                                                                     launch_env):
    """--zero at 2 ranks: reduce-scattered gradients (a sum of two in any order) and sharded
    Adam give the plain run's model bit for bit, also with --accumulate; with --clip, to
    rounding (the sharded norm adds per-shard sums)."""
    common = ["--epochs", "2", "--batch-size", "16", "--hidden", "32", "--optimizer", "adam",
              "--lr", "0.01"]
    models = {}
    for extra in ((), ("--zero",), ("--clip", "0.5"), ("--zero", "--clip", "0.5"),
                  ("--accumulate", "2"), ("--zero", "--accumulate", "2")):
        out = tmp_path / "-".join(("run", *extra))
        r = _train([*common, *extra, "--out", str(out)], launch_env, mpiexec, 2)
        assert r.returncode == 0, r.stderr
        models[extra] = load_state(out / "model.npz")["model"]
        if extra in ((), ("--zero",)):  # Adam's two moments: all of them, or half per rank
            state = json.loads((out / "summary.json").read_text())["optimizer_state_bytes"]
            n = json.loads((out / "summary.json").read_text())["parameters"]
            assert state == (8 * n if not extra else 8 * -(-n // 2)), (extra, state, n)
    plain, clipped = models[()], models[("--clip", "0.5")]
    assert any(not np.array_equal(clipped[k], plain[k]) for k in plain)  # clipping happened
    for k in plain:
        np.testing.assert_array_equal(models[("--zero",)][k], plain[k], err_msg=k)
        np.testing.assert_array_equal(models[("--zero", "--accumulate", "2")][k],
                                      models[("--accumulate", "2")][k], err_msg=k)
        np.testing.assert_allclose(models[("--zero", "--clip", "0.5")][k], clipped[k],
                                   rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("parallel", [("--parallel", "dp,tp"),
                                      ("--parallel", "dp,pp", "--microbatches", "2")])
def test_zero_over_the_replicas_of_a_model_parallel_job_gives_the_same_run(
        tmp_path, mpiexec, launch_env, parallel):
    """Megatron's distributed optimizer: 4 ranks, dp=2 replicas of a tensor-parallel model or
    of a two-stage pipeline; --zero shards each stage's (or shard's) Adam over the two
    replicas and reduce-scatters their gradients: the model bit for bit the plain run's; with
    --clip (the norm summed over every rank's slices), to rounding."""
    common = ["--epochs", "1", "--batch-size", "16", "--hidden", "32", "--optimizer", "adam",
              "--lr", "0.01", *parallel]
    models = {}
    for extra in ((), ("--zero",), ("--clip", "0.3"), ("--zero", "--clip", "0.3")):
        out = tmp_path / "-".join(("run", *extra))
        r = _train([*common, *extra, "--out", str(out)], launch_env, mpiexec, 4)
        assert r.returncode == 0, r.stderr
        models[extra] = load_state(out / "model.npz")["model"]
    plain, clipped = models[()], models[("--clip", "0.3")]
    assert any(not np.array_equal(clipped[k], plain[k]) for k in plain)
    for k in plain:
        np.testing.assert_array_equal(models[("--zero",)][k], plain[k], err_msg=k)
        np.testing.assert_allclose(models[("--zero", "--clip", "0.3")][k], clipped[k],
                                   rtol=1e-5, atol=1e-6, err_msg=k)


def test_zero_with_compressed_gradients_is_stage_1_and_the_same_run(tmp_path, mpiexec,
                                                                   launch_env):
    """--zero --compress: the compressor averages the gradients (its error feedback and
    PowerSGD state per rank as before), then each rank updates its slice: bit for bit the
    compressed run without --zero."""
    common = ["--epochs", "1", "--batch-size", "16", "--hidden", "32", "--optimizer", "adam",
              "--lr", "0.01", "--compress", "powersgd:2+ef"]
    models = []
    for extra in ((), ("--zero",)):
        out = tmp_path / ("zero" if extra else "plain")
        r = _train([*common, *extra, "--out", str(out)], launch_env, mpiexec, 2)
        assert r.returncode == 0, r.stderr
        models.append(load_state(out / "model.npz")["model"])
    for k in models[0]:
        np.testing.assert_array_equal(models[1][k], models[0][k], err_msg=k)


def test_study_compress_writes_the_table_plots_and_each_specs_gradient_error(tmp_path, mpiexec,
                                                                              launch_env):
    """`distad study compress` at 2 ranks: one row per spec, the exact run's bytes and
    error as references (error 0, cosine 1), top-k's ratio and a positive error, and the
    three plots."""
    out = tmp_path / "study"
    cmd = [str(mpiexec), "-n", "2", sys.executable, "-m", "distad", "study", "compress",
           "--specs", "none,topk:0.05+ef", "--epochs", "1", "--hidden", "32", "--no-progress",
           "--grad-error-every", "2", "--out", str(out)]
    r = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    rows = {row["spec"]: row for row in json.loads((out / "study.json").read_text())["rows"]}
    assert rows["none"]["grad_error"] == 0 and rows["none"]["grad_cosine"] == pytest.approx(1)
    assert rows["topk:0.05+ef"]["ratio"] > 5 and rows["topk:0.05+ef"]["grad_error"] > 0
    assert "grad cosine" in (out / "study.md").read_text()
    for png in ("loss_vs_step.png", "loss_vs_bytes.png", "fidelity_vs_ratio.png"):
        assert (out / png).stat().st_size > 1000, png


def _elastic_reference(ckpt_dir, ranks_before, ranks_after, batch):
    """The continuation of a checkpointed run on `ranks_after` ranks, computed in one process:
    the library's model, optimizer and schedule, and the global batches a resumed run must
    take (the rest of the stopped epoch's order, then whole epochs, each shared out over
    `ranks_after` strided shards): their union per step, one mean loss each."""
    from distad.data import epoch_permutation
    from distad.train import checkpoint as ck
    from distad.train import job

    cfg = TrainConfig(epochs=2, batch_size=batch, hidden="32", progress=False)
    Xtr, _, ytr, _ = job.load_dataset(cfg)
    n = len(Xtr)
    state = load_state(ck.rank_file(ck.latest_step_dir(ckpt_dir), 0))
    assert state["step"] == 28
    model = job.build_model(cfg, Xtr.shape[1:], 10)
    model.load_state_dict(state["model"])
    opt = job.make_optimizer(cfg, list(model.parameters()))
    opt.load_state_dict(state["optimizer"])
    per_epoch = {p: math.ceil(math.ceil(n / p) / batch) for p in (ranks_before, ranks_after)}
    epoch, done = divmod(state["step"], per_epoch[ranks_before])
    start = done * batch * ranks_before
    batches = []
    for e in range(epoch, cfg.epochs):
        rest = epoch_permutation(n, cfg.seed, e)[start if e == epoch else 0:]
        shards = np.resize(rest, -(-len(rest) // ranks_after) * ranks_after)
        shards = [shards[r::ranks_after] for r in range(ranks_after)]
        batches += [np.concatenate([s[i:i + batch] for s in shards])
                    for i in range(0, len(shards[0]), batch)]
    total = cfg.epochs * per_epoch[ranks_after]
    sched = job.make_schedule(cfg, opt, total)
    sched.seek(total - len(batches))
    for idx in batches:
        opt.zero_grad()
        ad.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        opt.step()
        sched.step()
    return {k: v.copy() for k, v in model.state_dict().items()}, total


@pytest.mark.parametrize("before,after,spec", [(2, 4, "none"), (4, 1, "none"), (2, 3, "none"),
                                               (4, 2, "topk:0.05+ef")])
def test_a_run_resumed_on_another_number_of_ranks_goes_on_from_the_sample_it_stopped_at(
        tmp_path, mpiexec, launch_env, before, after, spec):
    """Elastic resume: a run killed after its checkpoint of step 28 (mid-epoch) resumes on
    another number of ranks; the result equals the one-process computation over the rest of
    that epoch's samples and the next epoch, shared out over the new ranks."""
    common = ["--epochs", "2", "--batch-size", "16", "--hidden", "32", "--checkpoint-every", "7",
              "--compress", spec]
    ck = str(tmp_path / "ck")
    killed = _train([*common, "--checkpoint-dir", ck], dict(launch_env, DISTAD_KILL_AT_STEP="30"),
                    mpiexec, before)
    assert killed.returncode != 0
    if spec == "none":  # before the resumed run writes checkpoints of its own
        want, total = _elastic_reference(ck, before, after, 16)
    resumed = _train([*common, "--checkpoint-dir", ck, "--resume", "--out", str(tmp_path / "b")],
                     launch_env, mpiexec, after)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    got = load_state(tmp_path / "b" / "model.npz")["model"]
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().split("\n")
               if x]
    assert records[0] == {"step": records[0]["step"], "ranks": after, "resumed_from_step": 28,
                          "resumed_from_ranks": before}
    assert records[1]["step"] > records[0]["step"]
    if spec != "none":  # compressed: no closed form; it trains on, memory regrouped
        assert summary["ranks"] == after and summary["test_acc"] > 0.8
        return
    assert summary["steps"] == total
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("before,after", [(2, 4), (4, 3)])
def test_a_zero_run_resumed_on_another_number_of_ranks_equals_the_unsharded_one(
        tmp_path, mpiexec, launch_env, before, after):
    """The shards of the optimizer state (--zero) are put back together and re-sliced: the
    resumed sharded run ends where the same elastic resume of an unsharded run ends."""
    common = ["--epochs", "2", "--batch-size", "16", "--hidden", "32", "--checkpoint-every", "7",
              "--optimizer", "adam", "--lr", "0.01"]
    for name, zero in (("plain", []), ("zero", ["--zero"])):
        ck = str(tmp_path / f"ck-{name}")
        killed = _train([*common, *zero, "--checkpoint-dir", ck],
                        dict(launch_env, DISTAD_KILL_AT_STEP="30"), mpiexec, before)
        assert killed.returncode != 0
        r = _train([*common, *zero, "--checkpoint-dir", ck, "--resume", "--out",
                    str(tmp_path / name)], launch_env, mpiexec, after)
        assert r.returncode == 0, r.stderr
    plain = load_state(tmp_path / "plain" / "model.npz")["model"]
    zero = load_state(tmp_path / "zero" / "model.npz")["model"]
    for k in plain:
        np.testing.assert_allclose(zero[k], plain[k], rtol=1e-5, atol=1e-6, err_msg=k)
