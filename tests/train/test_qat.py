"""Quantisation-aware finishing (train/qat.py): the model trained in the phase is the merged-mxfp4 export."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.runs import make_run_dir
from helpers.training import synthetic_data, write_recipe

from gptoss_kernels.moe_reference import ExpertLoRA, moe_experts_reference
from gptoss_kernels.requantize import requantize
from gptoss_tune import load_model
from gptoss_tune.export.exporter import export_run
from gptoss_tune.model.adapter import load_with_adapter
from gptoss_tune.model.experts import MXFP4Experts
from gptoss_tune.train import qat

pytestmark = pytest.mark.xdist_group("train")


def _quiet(*_a, **_k):
    pass


def _ids(n=24, seed=0):
    return torch.randint(0, 201088, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["keep", "openai"])
def test_fake_quantised_model_equals_its_merged_mxfp4_export(tiny_ckpt, tmp_path, method):
    run = make_run_dir(tmp_path / "run", tiny_ckpt, lora={"rank": 2, "alpha": 4}, seed=2, scale=0.02)
    model = load_with_adapter(run / "checkpoints/step-00000010", device="cpu").eval()
    ids = _ids()
    with torch.no_grad():
        on_the_fly = model(input_ids=ids).logits
        qat.enable(model, method)
        fake = model(input_ids=ids).logits
    export_run(run, "merged-mxfp4", tmp_path / "mx", requant=method, effect=False, progress=_quiet)
    with torch.no_grad():
        exported = load_model(tmp_path / "mx", device="cpu").eval()(input_ids=ids).logits
    assert (on_the_fly - exported).abs().max() > 1e-3  # re-quantisation matters here, so equality means something
    torch.testing.assert_close(fake, exported, atol=1e-5, rtol=0)
    qat.disable(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, on_the_fly, atol=0, rtol=0)


def test_straight_through_gradient_is_the_lora_gradient_at_the_quantised_weight(tiny_ckpt):
    """With LoRA on down_proj and a loss linear in the output, the straight-through gradient to A and B equals
    the gradient of LoRA applied to the activations on top of the re-quantised weight (moe_experts_reference)."""
    model = load_model(tiny_ckpt, device="cpu", lora={"rank": 2, "alpha": 4, "attention": [], "experts": ["down_proj"]})
    m = next(x for x in model.modules() if isinstance(x, MXFP4Experts))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.down_proj_lora_B.copy_(torch.randn(m.down_proj_lora_B.shape, generator=g) * 0.05)
    T, k, E = 16, 4, m.num_experts
    x = torch.randn(T, m.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=g), -1)
    c = torch.randn(T, m.hidden_size, generator=g)

    qat.enable(model, "keep")
    (m(x, idx, w) * c).sum().backward()
    got = (m.down_proj_lora_A.grad.clone(), m.down_proj_lora_B.grad.clone())
    qat.disable(model)

    # the reference: the export's re-quantised bytes, LoRA on the activations, plain autograd
    blocks, scales = m.down_proj_blocks.clone(), m.down_proj_scales.clone()
    with torch.no_grad():
        for e in range(E):
            from gptoss_kernels.mxfp4 import dequantize

            merged = dequantize(blocks[e], scales[e], torch.float32) + m.lora_scaling * (
                m.down_proj_lora_B[e] @ m.down_proj_lora_A[e]
            )
            blocks[e], scales[e] = requantize(m.down_proj_blocks[e], m.down_proj_scales[e], merged, "keep")
    a = m.down_proj_lora_A.detach().clone().requires_grad_(True)
    b = m.down_proj_lora_B.detach().clone().requires_grad_(True)
    wts = m.packed_weights()._replace(down_blocks=blocks, down_scales=scales)
    y = moe_experts_reference(x, idx, w, wts, ExpertLoRA(None, None, a, b, m.lora_scaling), m.limit, m.alpha)
    (y * c).sum().backward()
    assert got[1].abs().max() > 0
    torch.testing.assert_close(got[0], a.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], b.grad, atol=1e-5, rtol=1e-4)


def test_phase_records_itself_and_the_export_is_the_trained_model(tiny_ckpt, tmp_path):
    """Train with quantization_aware.steps; the run records the phase, the export uses its re-quantiser by
    default, and its logits equal the fake-quantised model's; effect retained beats plain re-quantisation
    of the same run trained without the phase."""
    import gptoss_tune.train.trainer as trainer_mod
    from gptoss_tune.train.recipe import load_recipe

    effects = {}
    for name, qsteps in (("plain", 0), ("qat", 3)):
        d = tmp_path / name
        recipe = write_recipe(
            d,
            tiny_ckpt,
            train={"max_steps": 6, "lr": 1e-4, "warmup_ratio": 0.0},  # a small update (~1e-3 relative)
            eval={"every_steps": 0},
            early_stopping={"enabled": False},
            quantization_aware={"steps": qsteps},
        )
        trainer_mod.train(load_recipe(recipe), data=synthetic_data())
        rep = export_run(d / "run", "merged-mxfp4", d / "mx", checkpoint="last", progress=_quiet, effect_positions=64)
        effects[name] = rep
    rec = json.loads((tmp_path / "qat/run" / qat.RECORD).read_text())
    assert rec["requant"] == "keep" and rec["from_step"] == 3
    assert not (tmp_path / "plain/run" / qat.RECORD).exists()
    q, p = effects["qat"], effects["plain"]
    assert q["requantization"]["chosen_by"] == "the run's quantisation-aware phase"
    assert q["effect"]["reference"].startswith("the quantisation-aware model")
    assert q["effect"]["kl_tuned_base"] > 0  # the phase's model differs from the base
    assert q["effect"]["effect_retained"] > 0.999
    assert p["effect"]["effect_retained"] < q["effect"]["effect_retained"] - 0.05, (p["effect"], q["effect"])
    # a checkpoint written before the phase is an ordinary one, and the export says so
    lines = []
    rep = export_run(tmp_path / "qat/run", "merged-mxfp4", tmp_path / "pre", checkpoint="checkpoints/step-00000003",
                     effect=False, progress=lines.append)  # fmt: skip
    assert rep["requantization"]["chosen_by"] == "default (nothing measured)"
    assert any("predates the run's quantisation-aware phase" in line for line in lines)
    # the exported model's logits are the fake-quantised training model's
    model = load_with_adapter(tmp_path / "qat/run/final", device="cpu").eval()
    qat.enable(model, "keep")
    ids = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(tmp_path / "qat/mx", device="cpu").eval()(input_ids=ids).logits,
            model(input_ids=ids).logits,
            atol=1e-5,
            rtol=0,
        )
