from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deltaft.app import distributed
from deltaft.app.distributed import DistInfo, ShardSampler

ROOT = Path(__file__).resolve().parents[1]


def test_single_process_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_from_env("cpu")
    assert info == DistInfo() and info.is_main and not info.enabled
    assert distributed.current() == info
    tensor = torch.ones(3)
    assert info.all_reduce_sum(tensor) is tensor
    assert info.broadcast_object({"a": 1}) == {"a": 1}
    info.barrier()
    module = nn.Linear(2, 2)
    assert distributed.wrap(module, info, torch.device("cpu")) is module


def test_shard_sampler_sees_every_index_once() -> None:
    shards = [list(ShardSampler(range(10), DistInfo(rank=r, world_size=3))) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    assert [len(shard) for shard in shards] == [4, 3, 3]  # no padding, no repeats


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        for label in range(3):
            folder = tmp_path / "data" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (24, 24, 3)) + 80 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "deltaft", "--threads", "1", "train", "--data", str(tmp_path / "data"),
        "--model", "tests.toy_models:tiny_cnn", "--weights", "none", "--method", "delta",
        "--out", str(out), "--image-size", "32", "--batch-size", "4", "--epochs", "2",
        "--attention-epochs", "1", "--attention-batches", "2", "--workers", "0",
        "--device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run: ") == 1  # only rank 0 reports
    assert result.stderr.count("attention: 2 layers") == 1  # estimated once, on rank 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    # 24 images, 2 processes x batch 4: 3 steps per epoch, each seeing 8 images in total.
    assert [row["step"] for row in rows] == [3, 6]
    assert rows[0]["images"] == 24
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_images"] == 9 and summary["test_accuracy"] is not None
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and not any(k.startswith("module.") for k in last["model"])
    assert (out / "attention.safetensors").is_file()
