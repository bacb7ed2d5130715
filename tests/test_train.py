"""use-train end to end on tiny synthetic data: losses fall, backends agree, exact resume, torchrun
(gloo, 2 processes), and clear errors for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import use.train as train_mod
from use.synthetic import write_default_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--min-len", "24", "--max-len", "48",
        "--gap", "8", "--batch-size", "8", "--no-progress", "--log-interval", "1", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    write_default_dataset(d, num_users=120, events_per_user=(150, 300), num_eval_users=8, seed=3)
    return d / "train.txt"


def read_log(run):
    return [json.loads(l) for l in open(Path(run) / "log.jsonl")]


def run(data, out, *extra):
    return train_mod.train(["--data", str(data), "--output-dir", str(out), *TINY, *extra])


def test_losses_fall_and_model_dir_is_complete(data, tmp_path):
    s = run(data, tmp_path / "r", "--max-steps", "40", "--lr", "3e-3", "--eval-interval", "20")
    log = read_log(tmp_path / "r")
    first, last = log[0], log[-1]
    assert last["fep"] < first["fep"] - 0.05 and last["sup"] < first["sup"] - 0.3, (first, last)
    assert "val_fep" in last and last["tokens_per_s"] > 0 and s["steps"] == 40
    for name in ("config.json", "vocab.json", "model.safetensors", "summary.json", "train_args.json", "checkpoint/COMPLETE"):
        assert (tmp_path / "r" / name).is_file(), name
    from use.checkpoint import load_model_dir
    model, vocab = load_model_dir(tmp_path / "r")
    assert model.config.vocab_size == len(vocab) and model.config.hidden_size == 32


def test_torch_and_reference_backends_give_the_same_loss_curve(data, tmp_path):
    run(data, tmp_path / "t", "--max-steps", "8", "--backend", "torch")
    run(data, tmp_path / "r", "--max-steps", "8", "--backend", "reference")
    a, b = read_log(tmp_path / "t"), read_log(tmp_path / "r")
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert abs(x["fep"] - y["fep"]) < 1e-4 and abs(x["sup"] - y["sup"]) < 1e-3, (x, y)


def test_resume_continues_exactly(data, tmp_path, monkeypatch):
    flags = ["--max-steps", "6", "--save-interval", "3", "--dropout", "0.1", "--objective", "clm_fep_sup"]
    run(data, tmp_path / "full", *flags)
    full = read_log(tmp_path / "full")

    real_save = train_mod.save_checkpoint

    def save_then_crash(out_dir, core, vocab, opt, sched, sampler, step, tokens):
        real_save(out_dir, core, vocab, opt, sched, sampler, step, tokens)
        if step == 3:
            raise KeyboardInterrupt("simulated crash after the step-3 checkpoint")
    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path / "cut", *flags)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    run(data, tmp_path / "cut", *flags, "--resume")
    cut = read_log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(full[3:], cut[3:]):
        for k in ("clm", "fep", "sup", "lr"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7), (k, x, y)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_mod.fep_loss

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] >= 5 else out
    monkeypatch.setattr(train_mod, "fep_loss", poisoned)
    with pytest.raises(train_mod.TrainingError, match=r"loss became nan at step 5 .*checkpoint.*step 4"):
        run(data, tmp_path / "n", "--max-steps", "10", "--save-interval", "2", "--eval-interval", "0")
    assert (tmp_path / "n" / "checkpoint" / "COMPLETE").read_text().strip() == "4"


@pytest.mark.parametrize("argv, message", [
    (["--objective", "mlm"], "unknown objective 'mlm'"),
    (["--backend", "cuda"], "--backend 'cuda' is unknown"),
    (["--max-len", "10", "--min-len", "20"], "--max-len must be >= --min-len"),
    (["--fep-every", "0"], "--fep-every must be at least 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
])
def test_bad_flags(data, tmp_path, argv, message):
    """Checked before anything is read or written."""
    with pytest.raises((train_mod.TrainingError, ValueError), match=message):
        run(data, tmp_path / "x", *argv)


def test_too_short_users_and_empty_data(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a b c d\nb c d e f\n")
    with pytest.raises(train_mod.TrainingError, match="short.txt.*(too short|long enough)"):
        train_mod.train(["--data", str(short), "--output-dir", str(tmp_path / "o"), *TINY, "--max-steps", "1"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert train_mod.main(["--data", str(empty), "--output-dir", str(tmp_path / "e"), *TINY]) == 2


def test_rerun_without_resume_keeps_a_crashed_runs_checkpoint(data, tmp_path, monkeypatch):
    run(data, tmp_path / "c", "--max-steps", "4", "--save-interval", "2")
    (tmp_path / "c" / "model.safetensors").unlink()          # as if it had crashed after step 4
    with pytest.raises(train_mod.TrainingError, match="holds a checkpoint at step 4; pass --resume"):
        run(data, tmp_path / "c", "--max-steps", "4")
    assert train_mod.find_checkpoint(tmp_path / "c") is not None


def test_resume_with_other_vocabulary_is_refused(data, tmp_path):
    run(data, tmp_path / "v", "--max-steps", "2")
    other = tmp_path / "other.txt"
    other.write_text("\n".join(" ".join(f"x{(i * 7 + j) % 13}" for j in range(200)) for i in range(60)) + "\n")
    with pytest.raises(train_mod.TrainingError, match="does not match the checkpoint"):
        train_mod.train(["--data", str(other), "--output-dir", str(tmp_path / "v"), *TINY, "--max-steps", "4", "--resume"])


@pytest.mark.slow
def test_torchrun_two_processes_gloo(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
           "-m", "use.train", "--data", str(data), "--output-dir", str(tmp_path / "ddp"), *TINY,
           "--max-steps", "3", "--device", "cpu"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert "world 2" in p.stderr
    # rank 0 alone writes: one log line per step, one checkpoint
    assert len(read_log(tmp_path / "ddp")) == 3
    # every rank resumes its own shard from rank 0's checkpoint
    cmd[cmd.index("--max-steps") + 1] = "5"
    p = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and [r["step"] for r in read_log(tmp_path / "ddp")] == [1, 2, 3, 4, 5]


def test_cli_with_no_flags_runs_in_a_fresh_directory(tmp_path):
    """`use-train` with no flags: generates the synthetic default and trains (shortened by env)."""
    env = {**os.environ, "USE_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "use.train", "--max-steps", "3", "--no-progress"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "use-train summary" in p.stdout and (tmp_path / "runs" / "default" / "model.safetensors").is_file()


def test_fresh_run_into_an_old_directory_leaves_no_stale_weights(data, tmp_path, monkeypatch):
    run(data, tmp_path / "o", "--max-steps", "2", "--save-interval", "1")
    assert (tmp_path / "o" / "model.safetensors").exists() and (tmp_path / "o" / "checkpoint").exists()

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated crash in the first step")
    monkeypatch.setattr(train_mod.Objective, "forward", crash)
    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path / "o", "--max-steps", "2", "--hidden-size", "64", "--overwrite")
    # the new config is there, the old weights and checkpoint are not: nothing can mix the two
    assert '"hidden_size": 64' in (tmp_path / "o" / "config.json").read_text()
    assert not (tmp_path / "o" / "model.safetensors").exists()
    assert train_mod.find_checkpoint(tmp_path / "o") is None
