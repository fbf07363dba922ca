"""The toolkit's own adapter directory round-trips exactly."""

import pytest
import torch

from gptoss_tune import load_model
from gptoss_tune.errors import UserError
from gptoss_tune.model.adapter import load_with_adapter, save_adapter


def test_save_and_load_adapter(tiny_ckpt, tmp_path):
    torch.manual_seed(0)
    m = load_model(tiny_ckpt, device="cpu", lora={"rank": 2, "alpha": 4})
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(m, tmp_path / "ad")
    m2 = load_with_adapter(tmp_path / "ad", device="cpu")
    ids = torch.randint(0, 201088, (1, 10))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, m2(input_ids=ids).logits)


def test_adapter_errors(tmp_path):
    with pytest.raises(UserError, match="adapter.json"):
        load_with_adapter(tmp_path)


def test_adapter_for_another_model_or_lora_is_refused(tiny_ckpt, tiny_ckpt_topk4, tmp_path):
    from gptoss_tune.model.adapter import load_adapter_weights

    m = load_model(tiny_ckpt, device="cpu", lora={"rank": 2, "alpha": 4})
    save_adapter(m, tmp_path / "ad")
    with pytest.raises(UserError, match=r"adapter\.json: adapter was trained on num_hidden_layers=2, the model has 3"):
        load_with_adapter(tmp_path / "ad", base_model=tiny_ckpt_topk4, device="cpu")
    other = load_model(tiny_ckpt, device="cpu", lora={"rank": 2, "alpha": 4, "experts": ["down_proj"]})
    with pytest.raises(
        UserError,
        match=r"adapter\.safetensors: does not match the model's LoRA .*unexpected \['model\.layers\.0\.mlp\.experts\.gate_up_proj_lora_A",
    ):
        load_adapter_weights(other, tmp_path / "ad")
    wider = load_model(tiny_ckpt, device="cpu", lora={"rank": 4, "alpha": 8})
    with pytest.raises(
        UserError,
        match=r"'model\.layers\.0\.[a-z_.]+lora_A[a-z_.]*' has shape \[.*2, 64\], the model expects \[.*4, 64\]",
    ):
        load_adapter_weights(wider, tmp_path / "ad")
    (tmp_path / "ad" / "adapter.json").write_text("{oops")
    with pytest.raises(UserError, match=r"adapter\.json: not valid JSON"):
        load_with_adapter(tmp_path / "ad", device="cpu")
