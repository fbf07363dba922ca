"""load_model against stock transformers loading the same directory."""

import json
import shutil
import sys

import pytest
import torch
from helpers.reference import stock_model
from safetensors.torch import load_file, save_file

from gptoss_kernels.mxfp4 import dequantize, quantize_experts_io
from gptoss_tune import load_model
from gptoss_tune.model.experts import MXFP4Experts
from gptoss_tune.model.tiny import write_tiny_checkpoint


def _ids(seed=0, shape=(2, 20)):
    return torch.randint(0, 201088, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_topk4"])
def test_logits_equal_stock_transformers_fp32(fixture, request):
    path = request.getfixturevalue(fixture)
    ours = load_model(path, device="cpu", dtype=torch.float32)
    cfg = ours.config
    assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types) and cfg.num_experts_per_tok > 1
    assert all(isinstance(layer.mlp.experts, MXFP4Experts) for layer in ours.model.layers)
    ref = stock_model(path, torch.float32)
    ids = _ids()  # 20 tokens > sliding window of 4: sliding and full layers differ
    with torch.no_grad():
        a = ours(input_ids=ids).logits
        b = ref(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


def test_logits_equal_stock_transformers_bf16(tiny_ckpt):
    # bf16 tolerance: our CPU reference path performs the same bf16 operations in the same order as
    # transformers' eager experts, so the logits come out identical today; we allow a relative error of
    # 1e-2 (about two bf16 ulps, 2**-8 each, accumulated over the layers) so that a reordering of
    # sums (e.g. index_add vs a gather) does not fail the test while a wrong weight still would (a wrong
    # expert or nibble gives relative errors > 0.1).
    # transformers' eager attention on both sides: this test is about the experts and the loader. Our
    # default attention computes its softmax in fp32 (transformers' eager in bf16), which is as accurate
    # per token but flips the top-k routing of a token of this tiny random model (one token off by 37%).
    ours = load_model(tiny_ckpt, device="cpu", dtype=torch.bfloat16, attn_implementation="eager")
    ref = stock_model(tiny_ckpt, torch.bfloat16)
    ids = _ids(1)
    with torch.no_grad():
        a = ours(input_ids=ids).logits.float()
        b = ref(input_ids=ids).logits.float()
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 1e-2, rel


def test_sliding_window_matters(tiny_ckpt):
    """Guard against a test that cannot fail: changing the window changes the logits."""
    m = load_model(tiny_ckpt, device="cpu")
    ids = _ids(2)
    with torch.no_grad():
        a = m(input_ids=ids).logits
        m.config.sliding_window = 64
        for layer in m.model.layers:
            if layer.self_attn.sliding_window is not None:
                layer.self_attn.sliding_window = 64
        b = m(input_ids=ids).logits
    assert not torch.allclose(a, b, atol=1e-4)


def test_sharded_checkpoint_with_index_loads_identically(tiny_ckpt, tmp_path):
    sharded = write_tiny_checkpoint(tmp_path / "sharded", seed=1, sliding_window=4, max_shard_bytes=20_000_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a = load_model(tiny_ckpt, device="cpu")
    b = load_model(sharded, device="cpu")
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)


def test_checkpoint_layout_is_the_published_one(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "gpt_oss"
    assert cfg["quantization_config"] == {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    }
    assert (tiny_ckpt / "generation_config.json").is_file()
    sd = load_file(tiny_ckpt / "model.safetensors")
    E, I, H = cfg["num_local_experts"], cfg["intermediate_size"], cfg["hidden_size"]
    assert sd["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (E, 2 * I, H // 32, 16)
    assert sd["model.layers.0.mlp.experts.gate_up_proj_scales"].shape == (E, 2 * I, H // 32)
    assert sd["model.layers.0.mlp.experts.down_proj_blocks"].shape == (E, H, I // 32, 16)
    for k, v in sd.items():
        assert v.dtype == (torch.uint8 if k.endswith(("_blocks", "_scales")) else torch.bfloat16), k
    assert "model.layers.0.mlp.experts.gate_up_proj" not in sd


def test_init_tiny_is_deterministic(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=5, layers=1)
    b = write_tiny_checkpoint(tmp_path / "b", seed=5, layers=1)
    c = write_tiny_checkpoint(tmp_path / "c", seed=6, layers=1)
    fa, fb, fc = (open(p / "model.safetensors", "rb").read() for p in (a, b, c))
    assert fa == fb and fa != fc


def test_bf16_checkpoint_loads_and_matches(tiny_ckpt, tmp_path, monkeypatch):
    """A checkpoint with already-dequantised bf16 experts ([E, in, out], no quantization_config),
    quantised one expert at a time (a whole 120b layer at once needs ~32 GB of temporaries on the GPU)."""
    import gptoss_tune.model.loader as loader

    quantized = []

    def recording(w):
        quantized.append(tuple(w.shape))
        return quantize_experts_io(w)

    monkeypatch.setattr(loader, "quantize_experts_io", recording)
    out = tmp_path / "bf16"
    out.mkdir()
    sd = load_file(tiny_ckpt / "model.safetensors")
    dense = {}
    for k, v in sd.items():
        if k.endswith("_blocks"):
            base = k[: -len("_blocks")]
            dense[base] = dequantize(v, sd[base + "_scales"], torch.bfloat16).transpose(1, 2).contiguous()
        elif not k.endswith("_scales"):
            dense[k] = v
    save_file(dense, out / "model.safetensors")
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    a = load_model(tiny_ckpt, device="cpu")
    b = load_model(out, device="cpu")
    ids = _ids(3)
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    for la, lb in zip(a.model.layers, b.model.layers):
        assert lb.mlp.experts.gate_up_proj_blocks.dtype == torch.uint8
        assert torch.equal(la.mlp.experts.dequantized("gate_up_proj"), lb.mlp.experts.dequantized("gate_up_proj"))
    E = a.config.num_local_experts
    assert len(quantized) == 2 * E * len(a.model.layers) and all(shape[0] == 1 for shape in quantized)


def test_resident_expert_bytes_are_mxfp4(tiny_ckpt_topk4):
    m = load_model(tiny_ckpt_topk4, device="cpu", dtype=torch.bfloat16)
    cfg = m.config
    per_layer_weights = cfg.num_local_experts * 3 * cfg.hidden_size * cfg.intermediate_size
    for layer in m.model.layers:
        ex = layer.mlp.experts
        assert all(b.dtype == torch.uint8 for b in ex.buffers())
        assert ex.resident_bytes() == per_layer_weights // 32 * 17  # 4.25 bits a weight
        assert not any(p.dim() == 3 and p.dtype.is_floating_point for p in ex.parameters())  # no dense copy


def test_hub_id_from_local_cache(tiny_ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-gpt-oss" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_ckpt, snap)
    (cache / "models--acme--tiny-gpt-oss" / "refs").mkdir()
    (cache / "models--acme--tiny-gpt-oss" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    m = load_model("acme/tiny-gpt-oss", device="cpu")
    assert m.config.num_hidden_layers == 2


def test_an_experts_backend_that_cannot_run_here_is_a_user_error(monkeypatch):
    import types

    from gptoss_tune.errors import UserError
    from gptoss_tune.model import experts as ex_mod
    from gptoss_tune.model.config import tiny_config
    from gptoss_tune.model.loader import build_config

    ex = ex_mod.MXFP4Experts(build_config(tiny_config()), dtype=torch.float32)
    ex.backend = "triton"
    monkeypatch.delenv(ex_mod.BACKEND_ENV, raising=False)
    monkeypatch.setattr(ex_mod, "_triton_ops", lambda: None)
    with pytest.raises(
        UserError, match=r"experts backend 'triton': Triton or gptoss_kernels' Triton ops are not importable"
    ):
        ex.resolved_backend(torch.device("cpu"))
    monkeypatch.setattr(ex_mod, "_triton_ops", lambda: types.SimpleNamespace(INTERPRET=False))
    with pytest.raises(UserError, match=r"the Triton kernels run on CUDA tensors and the model is on cpu"):
        ex.resolved_backend(torch.device("cpu"))
    monkeypatch.setattr(ex_mod, "_triton_ops", lambda: types.SimpleNamespace(INTERPRET=True))
    assert ex.resolved_backend(torch.device("cpu")) == "triton"  # interpreted: the kernel tests' route
    monkeypatch.setenv(ex_mod.BACKEND_ENV, "gpu")
    with pytest.raises(UserError, match=r"GPTOSS_TUNE_EXPERTS_BACKEND='gpu': choose one of auto, reference, triton"):
        ex.resolved_backend(torch.device("cpu"))


def test_auto_backend_on_cuda_without_usable_kernels_warns_once_and_runs_the_reference(monkeypatch):
    """On CUDA "auto" means the fused kernels; when they cannot be used it falls back to the (much slower)
    reference, saying why once instead of silently. Interpreted kernels (TRITON_INTERPRET=1 when triton
    was imported, e.g. by the CPU kernel tests in the same process) are not used for CUDA tensors either."""
    import types
    import warnings

    from gptoss_tune.model import experts as ex_mod
    from gptoss_tune.model.config import tiny_config
    from gptoss_tune.model.loader import build_config

    ex = ex_mod.MXFP4Experts(build_config(tiny_config()), dtype=torch.float32)
    monkeypatch.delenv(ex_mod.BACKEND_ENV, raising=False)
    cuda = torch.device("cuda", 0)  # only the device type is looked at; no GPU needed
    monkeypatch.setattr(ex_mod, "_triton_ops", lambda: types.SimpleNamespace(INTERPRET=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ex.resolved_backend(cuda) == "triton"
    monkeypatch.setattr(ex_mod, "_WARNED_REFERENCE_ON_CUDA", False)
    monkeypatch.setattr(ex_mod, "_TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(ex_mod, "_triton_ops", lambda: None)
    with pytest.warns(
        RuntimeWarning,
        match=r"not used on CUDA: the kernels do not import \(ModuleNotFoundError: No module named 'triton'",
    ):
        assert ex.resolved_backend(cuda) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert ex.resolved_backend(cuda) == "reference"
    monkeypatch.setattr(ex_mod, "_WARNED_REFERENCE_ON_CUDA", False)
    monkeypatch.setattr(ex_mod, "_triton_ops", lambda: types.SimpleNamespace(INTERPRET=True))
    with pytest.warns(RuntimeWarning, match="Triton is running interpreted"):
        assert ex.resolved_backend(cuda) == "reference"
    assert ex.resolved_backend(torch.device("cpu")) == "reference"


def test_a_failing_triton_kernel_says_how_to_fall_back(monkeypatch):
    """A Triton compile or launch error (first met on a GPU) keeps its type and traceback, with a note
    naming the environment variable that runs the experts without the kernels."""
    import types

    from gptoss_tune.model import experts as ex_mod
    from gptoss_tune.model.config import tiny_config
    from gptoss_tune.model.loader import build_config

    def failing(*args, **kwargs):
        raise RuntimeError("PTXASError: ptxas fatal")

    ex = ex_mod.MXFP4Experts(build_config(tiny_config()), dtype=torch.float32)
    ex.backend = "triton"
    monkeypatch.delenv(ex_mod.BACKEND_ENV, raising=False)
    monkeypatch.setattr(ex_mod, "_triton_ops", lambda: types.SimpleNamespace(INTERPRET=True, moe_experts=failing))
    x = torch.randn(3, ex.hidden_size)
    idx = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="PTXASError") as info:
        ex(x, idx, torch.ones(3, 2))
    if sys.version_info >= (3, 11):
        assert any(f"{ex_mod.BACKEND_ENV}=reference" in n for n in info.value.__notes__)
