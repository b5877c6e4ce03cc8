"""Several processes (torchrun / gpp_onnx.distributed) on 2 CPU ranks with gloo: the DDP
steps against one process on the full batch, a prune where only rank 0 writes, and ranks
that see different data. Each launch starts two Python processes (~10-20 s)."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from gpp_onnx import distributed
from gpp_onnx.data import DataSpec, iter_batches, load_dataset
from gpp_onnx.samples import digits_cnn, sample_cnn

from conftest import child_env, feeds_for, run_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import ddp_step  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = child_env(OMP_NUM_THREADS="1", **extra)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None) if key not in extra else None
    return env


def _ranks(args_per_rank: list[list[str]], cwds: list[Path]) -> list[subprocess.CompletedProcess]:
    """Start one `python -m gpp_onnx` per rank with torchrun's environment, each in its
    own working directory (so a file any rank writes shows where it came from)."""
    port, world = str(_port()), len(args_per_rank)
    procs = [subprocess.Popen([sys.executable, "-m", "gpp_onnx", *args], cwd=cwd,
                              env=_env(WORLD_SIZE=str(world), RANK=str(r), LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, (args, cwd) in enumerate(zip(args_per_rank, cwds))]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate())
            for p in procs]


def _digits_and_rank_dirs(tmp_path: Path) -> tuple[Path, list[Path]]:
    """The digits CNN saved, and an empty working folder per rank of two."""
    src = tmp_path / "digits.onnx"
    onnx.save(digits_cnn(0), src)
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    for d in dirs:
        d.mkdir()
    return src, dirs


def test_batch_shares_are_disjoint_and_cover_the_batch():
    ds = load_dataset(DataSpec("digits", 1, 8, 8)).subset(np.arange(23))
    whole = [y for _, y in iter_batches(ds, 10, shuffle=True, seed=3)]
    parts = [[y for _, y in iter_batches(ds, 10, shuffle=True, seed=3, part=(i, 2))]
             for i in range(2)]
    assert [len(p) for p in parts] == [3, 3]          # 10, 10, 3: every batch shared
    for k, batch in enumerate(whole):
        assert np.array_equal(np.concatenate([parts[0][k], parts[1][k]]), batch)
    fours = [[len(y) for _, y in iter_batches(ds, 10, part=(i, 4))] for i in range(4)]
    assert fours == [[2, 2], [3, 3]] * 2               # the batch of 3 cannot feed 4 ranks


def test_helpers_without_a_process_group_are_one_process():
    assert (distributed.rank(), distributed.world_size(), distributed.part()) == (0, 1, (0, 1))
    assert distributed.is_writer() and distributed.all_sum(7) == 7
    assert distributed.from_writer(lambda a: a + 1, 1) == 2
    assert not distributed.setup({"WORLD_SIZE": "1"})


def test_ddp_steps_equal_one_process_on_the_full_batch(tmp_path):
    """2 ranks x half of a batch of 23 (11 + 12 images), two SGD steps, cross-entropy and
    cross-entropy + push: the weights equal one process's on the whole batch."""
    for _ in range(2):  # a second port if another program took the first one meanwhile
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_port()), str(ROOT / "tests" / "ddp_step.py"),
               str(tmp_path)]
        run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        if "address already in use" not in run.stderr.lower():
            break
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same order of sums
    try:
        reference = {f"ce/{k}": v for k, v in ddp_step.train([ddp_step.CrossEntropy()]).items()}
        reference.update({f"push/{k}": v for k, v in ddp_step.train(
            [ddp_step.CrossEntropy(), ddp_step.PushLoss(ddp_step.FEATURE, 10)]).items()})
    finally:
        torch.set_num_threads(threads)
    start = {t.name: onnx.numpy_helper.to_array(t) for t in digits_cnn(0).graph.initializer}
    # with BatchNorm put back each rank normalises by its own share (as DDP without
    # SyncBatchNorm does), so no one-process reference; the ranks must end equal, the
    # BatchNorms folded back into the same tensors
    normed = [k for k in ranks[0].files if k.startswith("renorm/")]
    assert sorted(k.split("/")[1] for k in normed) == sorted(start)
    for key in normed:
        assert np.array_equal(ranks[0][key], ranks[1][key]), key
    assert any(np.abs(ranks[0][k] - ranks[0]["ce/" + k.split("/")[1]]).max() > 1e-4
               for k in normed)
    assert sorted(k for k in ranks[0].files if k not in normed) == sorted(reference)
    for key, want in reference.items():
        moved = np.abs(want - start[key.split("/")[1]]).max()
        assert moved > 1e-4, key                        # the steps changed this weight
        assert np.array_equal(ranks[0][key], ranks[1][key]), key
        # a wrong weighting of the shares moves these weights by 3e-4 to 1e-3
        np.testing.assert_allclose(ranks[0][key], want, rtol=0, atol=1e-5, err_msg=key)


def test_prune_in_two_processes_writes_once(tmp_path):
    """The sample CNN has BatchNorm: running statistics end as rank 0's on every rank."""
    src = tmp_path / "sample.onnx"
    onnx.save(sample_cnn(0), src)
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    for d in dirs:
        d.mkdir()
    args = ["prune", str(src), "--data", "digits", "--ratio", "0.5", "--round-to", "1",
            "--finetune-epochs", "0.5", "--no-latency", "-o", "small.onnx",
            "--plan-out", "plan.json"]
    runs = _ranks([args, args], dirs)
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert sorted(p.name for p in dirs[0].iterdir()) == ["plan.json", "small.onnx",
                                                        "small.report.json"]
    assert list(dirs[1].iterdir()) == [] and runs[1].stdout == ""
    assert "gpp-onnx:" not in runs[1].stderr and "fine-tune" in runs[0].stderr
    small = onnx.load(str(dirs[0] / "small.onnx"))
    assert run_model(small, feeds_for(small))[0].shape == (2, 10)
    assert any(n.op_type == "BatchNormalization" for n in small.graph.node)


def test_ranks_with_different_data_stop_before_training(tmp_path):
    src, dirs = _digits_and_rank_dirs(tmp_path)
    common = ["push", str(src), "--data", "digits", "--epochs", "1", "-o", "pushed.onnx"]
    runs = _ranks([common + ["--limit", "1000"], common + ["--limit", "900"]], dirs)
    assert [r.returncode for r in runs] == [2, 2]
    errors = [line for line in runs[0].stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "different data" in errors[0] and "--limit" in errors[0]
    assert "error" not in runs[1].stderr
    assert "push 1/" not in runs[0].stderr                # stopped before training
    assert list(dirs[0].iterdir()) == list(dirs[1].iterdir()) == []


@pytest.mark.parametrize("what", ["models", "options"])
def test_ranks_with_another_model_or_other_options_stop_before_the_work(tmp_path, what):
    srcs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    onnx.save(digits_cnn(0), srcs[0])
    onnx.save(digits_cnn(0) if what == "options" else sample_cnn(), srcs[1])
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    for d in dirs:
        d.mkdir()
    macs = ["0.5", "0.5" if what == "models" else "0.3"]
    runs = _ranks([["prune", str(src), "--target-macs", m, "--no-latency", "-o", "p.onnx"]
                   for src, m in zip(srcs, macs)], dirs)
    assert [r.returncode for r in runs] == [2, 2]
    errors = [line for line in runs[0].stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"the processes see different {what}" in errors[0]
    assert "error" not in runs[1].stderr
    assert list(dirs[0].iterdir()) == list(dirs[1].iterdir()) == []


def test_an_error_one_rank_meets_alone_ends_every_rank(tmp_path):
    """Rank 1 alone is given data that does not exist: it says so and stops, and rank 0,
    waiting for it in a collective step, stops too instead of waiting for the timeout."""
    src, dirs = _digits_and_rank_dirs(tmp_path)
    args = ["prune", str(src), "--target-macs", "0.5", "--finetune-epochs", "0.2",
            "--no-latency", "-o", "p.onnx", "--data"]
    runs = _ranks([args + ["digits"], args + [str(tmp_path / "missing")]], dirs)
    assert [r.returncode for r in runs] == [2, 2]
    assert "unknown data source" in runs[1].stderr
    assert "another process stopped" in runs[0].stderr
    assert list(dirs[0].iterdir()) == list(dirs[1].iterdir()) == []


def test_gpp_rounds_in_two_processes_checkpoint_once(tmp_path):
    """The push/prune schedule: rank 0 alone keeps the work folder and writes the result."""
    src, dirs = _digits_and_rank_dirs(tmp_path)
    args = ["gpp", str(src), "--data", "digits", "--ratio", "0.5", "--rounds", "2",
            "--budget-epochs", "2", "--no-latency", "-o", "small.onnx", "--work-dir", "work"]
    runs = _ranks([args, args], dirs)
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert "round 2 checkpointed" in runs[0].stderr
    assert sorted(p.name for p in dirs[0].iterdir()) == ["small.onnx", "small.report.json"]
    assert list(dirs[1].iterdir()) == [] and runs[1].stdout == ""


def test_an_interrupt_under_torchrun_ends_every_rank_at_once(tmp_path):
    """Ctrl-C reaching rank 0 mid-run (after round 1 is checkpointed): rank 0 says it was
    interrupted and stops; rank 1, waiting for it in a collective step, stops too, instead
    of both waiting at the closing barrier for the process group's timeout."""
    import signal
    import time

    src, dirs = _digits_and_rank_dirs(tmp_path)
    # short rounds, then a final fine-tune of about 300 epochs that the interrupt cuts short
    # however fast the machine is
    args = ["gpp", str(src), "--data", "digits", "--ratio", "0.5", "--rounds", "3",
            "--budget-epochs", "300", "--push-share", "0.01", "--no-latency", "-o",
            "small.onnx", "--work-dir", "work"]
    port = str(_port())
    # SIGINT's default handling in the ranks, whatever the shell that started the tests set
    procs = [subprocess.Popen([sys.executable, "-m", "gpp_onnx", *args], cwd=d,
                              env=_env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
             for r, d in enumerate(dirs)]
    try:
        deadline = time.monotonic() + 240
        while not (dirs[0] / "work" / "state.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (dirs[0] / "work" / "state.json").exists()
        procs[0].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:  # a rank left waiting would hold the port and the cores
            if p.poll() is None:
                p.kill()
    err = [p.communicate()[1] for p in procs]
    assert codes == [130, 2], err[1][-1500:]
    assert "gpp-onnx: interrupted; no output was written; the finished rounds are kept" in err[0]
    assert "another process stopped" in err[1]
    assert not (dirs[0] / "small.onnx").exists() and list(dirs[1].iterdir()) == []
