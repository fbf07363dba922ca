"""Bad checkpoints: one clear line naming what is wrong, no traceback, non-zero exit from the CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_tune import load_model
from gptoss_tune.errors import CheckpointError


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gptoss_tune", *args], capture_output=True, text=True, timeout=120)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors")


def _mk_missing_tensor(p):
    _rewrite(p, lambda sd: sd.pop("model.layers.1.mlp.experts.down_proj_scales"))
    return "model.layers.1.mlp.experts.down_proj_scales"


def _mk_wrong_shape(p):
    def f(sd):
        sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:-1].clone()

    _rewrite(p, f)
    return "model.layers.0.self_attn.q_proj.weight"


def _mk_wrong_dtype(p):
    def f(sd):
        sd["model.layers.0.mlp.experts.gate_up_proj_blocks"] = sd[
            "model.layers.0.mlp.experts.gate_up_proj_blocks"
        ].float()

    _rewrite(p, f)
    return "uint8"


def _mk_truncated(p):
    f = p / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return "truncated"


def _mk_not_gpt_oss(p):
    cfg = json.loads((p / "config.json").read_text())
    cfg["model_type"] = "llama"
    (p / "config.json").write_text(json.dumps(cfg))
    return "'llama'"


def _mk_no_config(p):
    (p / "config.json").unlink()
    return "config.json"


def _mk_unexpected(p):
    _rewrite(p, lambda sd: sd.__setitem__("model.layers.7.extra", torch.zeros(2, dtype=torch.bfloat16)))
    return "model.layers.7.extra"


CASES = {
    "missing_tensor": _mk_missing_tensor,
    "wrong_shape": _mk_wrong_shape,
    "wrong_dtype": _mk_wrong_dtype,
    "truncated": _mk_truncated,
    "not_gpt_oss": _mk_not_gpt_oss,
    "no_config": _mk_no_config,
    "unexpected_tensor": _mk_unexpected,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_is_a_clear_error(case, tiny_ckpt, tmp_path):
    p = _copy(tiny_ckpt, tmp_path / "ckpt")
    needle = CASES[case](p)
    with pytest.raises(CheckpointError) as e:
        load_model(p, device="cpu")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_reports_one_line_and_exit_code(tiny_ckpt, tmp_path):
    p = _copy(tiny_ckpt, tmp_path / "ckpt")
    _mk_wrong_shape(p)
    r = _cli("inspect", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("gptoss-tune")]
    assert len(lines) == 1 and "q_proj.weight" in lines[0] and "model.safetensors" in lines[0], r.stderr

    r = _cli("inspect", str(tmp_path / "does-not-exist"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr

    r = _cli("inspect", "nobody/not-cached-model")
    assert r.returncode == 2 and "hf download" in r.stderr and "Traceback" not in r.stderr


def test_cli_inspect_reports_mxfp4(tiny_ckpt):
    r = _cli("inspect", str(tiny_ckpt), "--json", "--lora-rank", "2")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["expert_bits_per_weight"] == 4.25 and info["lora_parameters"] > 0


def test_cli_init_tiny_bad_flag_value(tmp_path):
    r = _cli("init-tiny", str(tmp_path / "x"), "--hidden", "48")
    assert r.returncode == 2 and "multiple of 32" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--layers", "0"], "--layers must be a positive integer, got 0"),
        (["--experts", "-2"], "--experts must be a positive integer, got -2"),
        (["--head-dim", "15"], "--head-dim must be even"),
        (["--sliding-window", "0"], "--sliding-window must be a positive integer"),
    ],
)
def test_init_tiny_refuses_sizes_that_cannot_load(tmp_path, flags, message):
    from gptoss_tune.errors import UserError
    from gptoss_tune.model.tiny import write_tiny_checkpoint

    names = {
        "--layers": "layers",
        "--experts": "experts",
        "--head-dim": "head_dim",
        "--sliding-window": "sliding_window",
    }
    with pytest.raises(UserError, match=message):
        write_tiny_checkpoint(tmp_path / "x", **{names[flags[0]]: int(flags[1])})
    assert not (tmp_path / "x").exists()  # nothing written


def test_pad_token_outside_the_vocabulary_is_a_clear_error(tiny_ckpt, tmp_path):
    p = _copy(tiny_ckpt, tmp_path / "ckpt")
    cfg = json.loads((p / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"config\.json: pad_token_id 199999 is not a token of the vocabulary \(vocab_size 1000\)"
    ):
        load_model(p, device="cpu")


def test_bad_device_and_attention_are_user_errors(tiny_ckpt):
    from gptoss_tune.errors import UserError

    with pytest.raises(UserError, match="device 'gpu0': not a torch device"):
        load_model(tiny_ckpt, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device 'cuda': no CUDA device is available here"):
            load_model(tiny_ckpt, device="cuda")
    # sdpa: transformers refuses it for gpt-oss; flash_attention_2 would need a download (the `kernels` package)
    for name in ("sdpa", "flash_attention_2"):
        with pytest.raises(UserError, match=f"attn_implementation '{name}': transformers cannot run it for gpt-oss"):
            load_model(tiny_ckpt, device="cpu", attn_implementation=name)


def test_cli_inspect_on_an_absent_device_is_one_line(tiny_ckpt):
    r = _cli("inspect", str(tiny_ckpt), "--device", "cuda:7")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("gptoss-tune inspect: error: device 'cuda:7'") and r.stderr.count("\n") == 1


def test_init_tiny_into_a_file_is_one_line(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    r = _cli("init-tiny", str(f))
    assert (
        r.returncode == 2
        and r.stderr == f"gptoss-tune init-tiny: error: {f}: is a file; pass a directory to write the checkpoint into\n"
    )
    assert f.read_text() == "mine"
