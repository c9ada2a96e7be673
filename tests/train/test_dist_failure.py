"""A process of a 2-process run dies or hangs: the survivor ends with one paragraph (what happened, the intact
checkpoint, the command that continues), no traceback, no hang past `train.dist_timeout_s`, and `--resume`
finishes the run. Real processes: under torchrun, and started by hand from the launcher's environment
variables (as a second node's would be). The classification helpers are tested on the backends' own words."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmlab.config import ConfigError
from llmlab.runner import resolve_config
from llmlab.train.checkpoint import latest_checkpoint, load_checkpoint
from llmlab.train.config import TrainConfig
from llmlab.train.distributed import (
    DistEnv,
    ProcessGroupError,
    describe_failure,
    init_distributed,
    is_process_group_failure,
)
from tests.runs import torchrun, train_rows

# mnist-mlp smoke on the bundled digits: 32 steps per epoch, so 12 epochs = 384 steps (~6 s for two
# processes here) — long enough that a kill right after the first checkpoint (step 50) lands mid-run (the
# tests check it did: status "failed" with fewer steps).
ARGS = [
    "run",
    "mnist-mlp",
    "--preset",
    "smoke",
    "--device",
    "cpu",
    "train.max_epochs=12",
    "model.hidden=256",
    "train.checkpoint_every=50",
    "train.eval_every=128",
]
TOTAL_STEPS = 384
# The hand-started run's process-group timeout. It also bounds the rendezvous and every collective of the
# healthy part of the run, so it must exceed any pause a loaded machine gives one process (the suite runs
# two test workers on 2 cores: a 3 s timeout can expire while rank 1 is still importing torch).
TIMEOUT_S = 10


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "LLMLAB_PROGRESS": "0", "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, procs: list[subprocess.Popen], seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert time.time() < deadline, f"{path} did not appear"
        assert all(p.poll() is None for p in procs), "a process ended before the first checkpoint"
        time.sleep(0.02)


def _assert_clean_failure(stderr: str, out: Path, what: str | tuple[str, ...]) -> None:
    """One `llmlab: error:` paragraph naming `what`, the checkpoint and the resume command; no frames of
    ours."""
    lines = [line for line in stderr.splitlines() if line.startswith("llmlab: error: the run stopped")]
    assert len(lines) == 1, stderr[-3000:]
    message = lines[0]
    assert any(w in message for w in ((what,) if isinstance(what, str) else what)), message
    assert "--resume" in message and str(out / "checkpoints" / "step_") in message, message
    assert 'File "' not in stderr.replace(_torchrun_traceback(stderr), ""), "a traceback of llmlab leaked"


def _torchrun_traceback(stderr: str) -> str:
    """torchrun's agent prints its own ChildFailedError traceback (not ours): the part from its first line."""
    start = stderr.find("Traceback (most recent call last):")
    if start < 0 or "torch/distributed/run.py" not in stderr[start:]:
        return ""
    return stderr[start:]


def _check_resumable(out: Path) -> int:
    """The checkpoint `latest` names loads (weights and trainer state); its step."""
    path = latest_checkpoint(out / "checkpoints")
    assert path is not None
    weights, state = load_checkpoint(path)
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    return state["trainer"]["step"]


def _assert_finished(out: Path, killed_at: int) -> None:
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == TOTAL_STEPS
    assert result["world_size"] == 2
    steps = [r["step"] for r in train_rows(out)]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after the resume"
    assert killed_at < TOTAL_STEPS


@pytest.mark.slow
def test_killed_rank_under_torchrun_then_resume(tmp_path):
    out = tmp_path / "run"
    launch = [*torchrun(2), "-m", "llmlab", *ARGS, "--out", str(out)]
    with (tmp_path / "err").open("w") as err:
        agent = subprocess.Popen(launch, env=_env(), stdout=subprocess.DEVNULL, stderr=err, text=True)
        _wait_for(out / "checkpoints" / "latest", [agent])
        # the worker whose RANK is 1: SIGKILL, as the kernel's OOM killer would
        workers = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(agent.pid)], capture_output=True, text=True
        ).stdout.split()
        ranks = {pid: Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in workers}
        victim = next(int(pid) for pid, env in ranks.items() if b"RANK=1" in env)
        os.kill(victim, signal.SIGKILL)
        agent.wait(timeout=120)
    stderr = (tmp_path / "err").read_text()
    assert agent.returncode != 0
    # Which comes first on the survivor is a race: gloo's "connection reset" or torchrun's SIGTERM (its agent
    # stops the other workers when one dies). Either ends in the paragraph.
    _assert_clean_failure(stderr, out, ("another process of the run is gone", "received SIGTERM"))
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "failed" and record["steps"] < TOTAL_STEPS, "the kill came too late"
    killed_at = _check_resumable(out)

    resumed = subprocess.run([*launch, "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_finished(out, killed_at)


@pytest.mark.slow
def test_hung_rank_started_by_hand_times_out_then_resumes(tmp_path):
    """Processes started from the variables a launcher sets; rank 1 is stopped (SIGSTOP: alive but silent,
    as a deadlocked or swapped-out process): rank 0 fails after train.dist_timeout_s (TIMEOUT_S), not after
    torch's 30 min."""
    out = tmp_path / "run"
    port = str(_free_port())
    cmd = [sys.executable, "-m", "llmlab", *ARGS, f"train.dist_timeout_s={TIMEOUT_S}", "--out", str(out)]

    def start(rank: int, extra: list[str]) -> subprocess.Popen:
        env = _env(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
        )
        return subprocess.Popen(
            cmd + extra, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    rank0, rank1 = start(0, []), start(1, [])
    try:
        _wait_for(out / "checkpoints" / "latest", [rank0, rank1])
        rank1.send_signal(signal.SIGSTOP)
        stopped = time.time()
        _, stderr = rank0.communicate(timeout=120)
        waited = time.time() - stopped
    finally:
        rank1.kill()
        rank1.communicate()
    assert rank0.returncode == 1
    _assert_clean_failure(stderr, out, f"waited train.dist_timeout_s = {TIMEOUT_S} s")
    assert waited < 60, f"rank 0 took {waited:.0f} s to give up on a {TIMEOUT_S} s timeout"
    killed_at = _check_resumable(out)

    port = str(_free_port())  # the same command with --resume, on both "nodes"
    rank0, rank1 = start(0, ["--resume"]), start(1, ["--resume"])
    for proc in (rank0, rank1):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    _assert_finished(out, killed_at)


# ------------------------------------------------------------------------------ the pieces, in-process
GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1446: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the "
    "application. Check the logs of the remote worker before reporting an error. GLHF!"
)
GLOO_TIMEOUT = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
    "5000ms for recv operation to complete"
)


def test_backend_errors_are_recognised_and_described():
    env = DistEnv(rank=1, world_size=2, timeout_s=5)
    assert is_process_group_failure(RuntimeError(GLOO_RESET))
    assert is_process_group_failure(RuntimeError(GLOO_TIMEOUT))
    # a bug of ours (shape mismatch) is not a dead peer: it must keep its traceback
    shapes = RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")
    assert not is_process_group_failure(shapes)
    assert not is_process_group_failure(ValueError("Connection reset by peer"))
    dead = describe_failure(RuntimeError(GLOO_RESET), env)
    assert "rank 1 of 2" in dead and "gone" in dead
    assert dead.endswith("Read error [127.0.0.1]:1446: Connection reset by peer"), dead  # no path, no GLHF
    silent = describe_failure(RuntimeError(GLOO_TIMEOUT), env)
    assert "train.dist_timeout_s = 5 s" in silent and "no answer" in silent


def test_dist_timeout_is_validated_and_may_change_on_resume():
    with pytest.raises(ValueError, match="dist_timeout_s"):
        TrainConfig(dist_timeout_s=0)
    with pytest.raises(ConfigError):
        resolve_config("mnist-mlp", "smoke", ["train.dist_timeout_s=-1"])
    from llmlab.runner import ENGINE_KEYS

    assert "train.dist_timeout_s" in ENGINE_KEYS  # how long to wait, not what is computed


def test_half_set_launcher_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ProcessGroupError, match="MASTER_ADDR, MASTER_PORT not set"):
        init_distributed(torch.device("cpu"))
