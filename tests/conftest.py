"""Shared fixtures. Everything runs offline on the CPU; tiny checkpoints are written per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: one torch thread per xdist worker avoids oversubscription.
torch.set_num_threads(int(os.environ.get("GPTOSS_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Default tiny model, but with a 4-token sliding window so short sequences exercise both layer types."""
    from gptoss_tune.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=1, sliding_window=4)


@pytest.fixture(scope="session")
def tiny_ckpt_topk4(tmp_path_factory):
    from gptoss_tune.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny4") / "ckpt",
        seed=2,
        sliding_window=4,
        layers=3,
        experts=6,
        top_k=4,
        hidden=64,
        intermediate=96,
    )
