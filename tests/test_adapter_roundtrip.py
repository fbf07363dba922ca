"""The toolkit's own adapter directory round-trips exactly."""

import pytest
import torch

from gptoss_tune import load_model
from gptoss_tune.adapter import load_with_adapter, save_adapter
from gptoss_tune.errors import UserError


def test_save_and_load_adapter(tiny_ckpt, tmp_path):
    torch.manual_seed(0)
    m = load_model(tiny_ckpt, device="cpu", lora={"rank": 2, "alpha": 4})
    with torch.no_grad():
        for n, p in m.named_parameters():
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
