"""Checkpoints a careless or hostile user points us at: symlink loops, absurd config.json sizes, float16
weights, an index that names files elsewhere; and `validate` checking every header without reading data."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.training import write_recipe
from safetensors.torch import load_file, save_file

from gptoss_tune import load_model
from gptoss_tune.errors import CheckpointError
from gptoss_tune.model import checkpoint as checkpoint_module
from gptoss_tune.model.loader import check_checkpoint
from gptoss_tune.model.tiny import write_tiny_checkpoint


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gptoss_tune", *args], capture_output=True, text=True, timeout=300)


def _one_line_exit_2(r, *needles):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("gptoss-tune")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), r.stderr


def _copy(src, dst):
    return Path(shutil.copytree(src, dst, symlinks=True))


def _config(p: Path, **changes):
    cfg = json.loads((p / "config.json").read_text())
    cfg.update(changes)
    (p / "config.json").write_text(json.dumps(cfg))


def test_symlink_loops_are_one_line(tiny_ckpt, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    with pytest.raises(CheckpointError, match=rf"^model path '{loop}' is a symbolic link loop"):
        load_model(loop, device="cpu")
    _one_line_exit_2(_cli("inspect", str(loop)), "symbolic link loop", str(loop))

    for name in ("model.safetensors", "config.json"):
        p = _copy(tiny_ckpt, tmp_path / f"ckpt-{name}")
        (p / name).unlink()
        (p / name).symlink_to(p / name)  # a link to itself
        with pytest.raises(CheckpointError, match=rf"^{p / name} is a symbolic link loop"):
            load_model(p, device="cpu")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"vocab_size": 10**12}, "'vocab_size' is 1,000,000,000,000, far beyond any gpt-oss model (at most 4,194,304 is accepted)"),
        ({"hidden_size": 0}, "'hidden_size' must be a positive integer, got 0"),
        ({"num_hidden_layers": -3}, "'num_hidden_layers' must be a positive integer, got -3"),
        ({"num_local_experts": True}, "'num_local_experts' must be a positive integer, got True"),
        ({"intermediate_size": 64.0}, "'intermediate_size' must be a positive integer, got 64.0"),
        ({"hidden_size": 48}, "'hidden_size' must be a multiple of 32 (MXFP4 blocks hold 32 weights), got 48"),
        ({"head_dim": 15}, "'head_dim' must be even"),
        ({"num_key_value_heads": 3}, "'num_attention_heads' (4) must be a multiple of 'num_key_value_heads' (3)"),
        ({"num_experts_per_tok": 9}, "'num_experts_per_tok' (9) cannot exceed 'num_local_experts' (8)"),
        ({"max_position_embeddings": 10**10}, "'max_position_embeddings' is 10,000,000,000, far beyond"),
    ],
)  # fmt: skip
def test_absurd_config_sizes_are_refused_naming_the_key(tiny_ckpt, tmp_path, changes, message):
    p = _copy(tiny_ckpt, tmp_path / "ckpt")
    _config(p, **changes)
    with pytest.raises(CheckpointError) as e:
        load_model(p, device="cpu")
    assert str(e.value).startswith(f"{p / 'config.json'}: {message}"), str(e.value)


def test_vocab_of_10_to_the_12_fails_without_allocating(tiny_ckpt, tmp_path):
    p = _copy(tiny_ckpt, tmp_path / "ckpt")
    _config(p, vocab_size=10**12)
    # 256 TB would be asked for: capped at 8 GB of address space, an attempt would fail with a traceback
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30));"
        "from gptoss_tune.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run([sys.executable, "-c", code, "inspect", str(p)], capture_output=True, text=True, timeout=300)
    _one_line_exit_2(r, "'vocab_size' is 1,000,000,000,000")


def test_a_config_that_does_not_match_the_weights_fails_before_memory_is_taken(tiny_ckpt, tmp_path, monkeypatch):
    p = _copy(tiny_ckpt, tmp_path / "ckpt")
    _config(p, num_hidden_layers=200, layer_types=["full_attention"] * 200)  # plausible size, wrong for these weights

    def no_allocation(*a, **k):
        raise AssertionError("memory was allocated before the headers were checked")

    monkeypatch.setattr(torch.nn.Module, "to_empty", no_allocation)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.2\..*' is missing from the checkpoint"):
        load_model(p, device="cpu")


def _rewrite(p: Path, fn):
    sd = load_file(p / "model.safetensors")
    fn(sd)
    save_file(sd, p / "model.safetensors", metadata={"format": "pt"})


def test_float16_weights_are_refused_naming_tensor_and_file_fp32_accepted(tiny_ckpt, tmp_path):
    q = "model.layers.0.self_attn.q_proj.weight"
    p = _copy(tiny_ckpt, tmp_path / "fp16")
    _rewrite(p, lambda sd: sd.__setitem__(q, sd[q].half()))
    with pytest.raises(CheckpointError) as e:
        load_model(p, device="cpu")
    assert str(e.value).startswith(f"{p / 'model.safetensors'}: tensor '{q}' has dtype float16, expected bf16")
    assert "float16 cannot hold bf16's range" in str(e.value)
    with pytest.raises(CheckpointError, match="has dtype float16"):
        check_checkpoint(p)

    p = _copy(tiny_ckpt, tmp_path / "fp32")
    _rewrite(p, lambda sd: sd.__setitem__(q, sd[q].float()))
    model = load_model(p, device="cpu", dtype="fp32")
    ref = load_file(tiny_ckpt / "model.safetensors")[q].float()
    assert torch.equal(model.state_dict()[q], ref)  # fp32 holds every bf16 value exactly


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sharded") / "ckpt", seed=3, max_shard_bytes=40 << 20)


@pytest.mark.parametrize("target", ["../other/{f}", "/abs/{f}", "sub/../../{f}", "..\\{f}"])
def test_the_index_may_not_name_files_outside_the_checkpoint(sharded, tmp_path, target):
    p = _copy(sharded, tmp_path / "ckpt")
    index = json.loads((p / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    (tmp_path / "other").mkdir()
    name, f = next(iter(index["weight_map"].items()))
    shutil.copy(p / f, tmp_path / "other" / f)  # a loadable file there: the path alone is refused
    index["weight_map"][name] = target.format(f=f)
    (p / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_model(p, device="cpu")
    assert str(e.value).startswith(
        f"{p / 'model.safetensors.index.json'}: tensor '{name}' is mapped to {target.format(f=f)!r}, which is not a file "
        f"inside the checkpoint directory"
    )


def test_links_inside_the_checkpoint_still_load(sharded, tmp_path):
    """The Hugging Face cache links each snapshot file to a blob elsewhere: links are followed, names are checked."""
    p = tmp_path / "snapshot"
    p.mkdir()
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in sharded.iterdir():
        shutil.copy(f, blobs / f.name)
        (p / f.name).symlink_to(blobs / f.name)
    assert check_checkpoint(p)["model_type"] == "gpt_oss"


def test_validate_checks_every_header_before_the_data(tiny_ckpt, tmp_path):
    p = _copy(tiny_ckpt, tmp_path / "ckpt")
    _rewrite(p, lambda sd: sd.__setitem__("model.norm.weight", sd["model.norm.weight"][:-1].clone()))
    recipe = write_recipe(tmp_path, p)
    r = _cli("validate", str(recipe))
    _one_line_exit_2(r, "model.path:", "tensor 'model.norm.weight' has shape", "model.safetensors")
    assert r.stderr.startswith(f"gptoss-tune validate: error: {recipe}:")  # the recipe line of model.path


def _sparse_header_set(out: Path, cfg: dict, shards: int = 15) -> int:
    """A checkpoint of `cfg`'s sizes whose files hold real safetensors headers and no data (sparse files,
    so a 65 GB 120b set takes no disk). Names, dtypes and shapes follow the published MXFP4 layout."""
    from gptoss_tune.model.loader import _expected_tensors, build_config, build_empty_model

    model = build_empty_model(build_config(cfg), torch.bfloat16)
    code = {torch.uint8: ("U8", 1), torch.bfloat16: ("BF16", 2), torch.float32: ("BF16", 2)}
    items = [(n, list(s), *code[d]) for n, (s, d) in _expected_tensors(model).items()]
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    per, weight_map, total = -(-len(items) // shards), {}, 0
    for k in range(shards):
        fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, size in items[k * per : (k + 1) * per]:
            n = size * int(torch.tensor(shape).prod()) if shape else size
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            f.truncate(8 + len(h) + offset)
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def test_checking_a_120b_header_set_reads_no_tensor_data_and_is_fast(tmp_path, monkeypatch):
    from gptoss_tune.model.config import published_config

    total = _sparse_header_set(tmp_path / "120b", published_config("120b"))
    assert total > 60e9
    real = checkpoint_module.safe_open

    class HeadersOnly:
        def __init__(self, *a, **k):
            self.inner = real(*a, **k)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return self.inner.get_slice(name)

        def get_tensor(self, name):
            raise AssertionError(f"tensor data of {name} was read")

    monkeypatch.setattr(checkpoint_module, "safe_open", HeadersOnly)
    t = time.perf_counter()
    cfg = check_checkpoint(tmp_path / "120b")
    seconds = time.perf_counter() - t
    assert cfg["num_local_experts"] == 128
    assert seconds < 20, seconds  # 0.2 s measured on one core (meta model + 687 headers)
