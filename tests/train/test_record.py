"""What a run record says about the machine: hardware, versions, commit, memory."""

from __future__ import annotations

import torch

from llmlab.train.record import git_commit, hardware_info, peak_memory, versions


def test_hardware_and_versions():
    hw = hardware_info()
    assert hw["cpu_count"] >= 1 and hw["cpu"] and hw["gpu_count"] == torch.cuda.device_count()
    v = versions()
    assert v["torch"] == torch.__version__ and v["python"].count(".") == 2


def test_git_commit_of_this_checkout_or_none(tmp_path):
    commit = git_commit()
    assert commit is None or len(commit.split("+")[0]) == 40
    assert git_commit(tmp_path) is None  # not a repository


def test_peak_memory_on_cpu_is_the_process_high_water_mark():
    mib, kind = peak_memory(torch.device("cpu"))
    assert kind == "cpu_max_rss" and mib > 10
