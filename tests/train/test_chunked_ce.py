"""Chunked linear + cross-entropy against F.cross_entropy on full logits (and transformers' own loss)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gptoss_tune import load_model
from gptoss_tune.train.chunked_ce import lm_eval_sums, lm_loss_sum


def _data(B=3, L=29, H=24, V=1000, dtype=torch.float64, seed=0, w_grad=True):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, L, H, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_(w_grad)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :6] = -100  # a prompt
    labels[1, 17:] = -100  # padding
    if B > 2:
        labels[2, ::3] = -100
    return h, w, labels


def _plain(h, w, labels):
    """What transformers does: full logits, upcast, shift, mean over trained tokens."""
    logits = (h @ w.t()).float() if h.dtype != torch.float64 else h @ w.t()
    V = w.shape[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_loss_and_gradients_equal_full_logits_fp64(chunk):
    h, w, labels = _data()
    loss, n = lm_loss_sum(h, w, labels, chunk_tokens=chunk)
    assert n.item() == (labels[:, 1:] != -100).sum().item()
    (loss / n).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = _plain(h, w, labels)
    (ref / n).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(gh, h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-12)
    # position t predicts labels[t + 1]: row 1 is trained up to label 16, so hidden 0..15 get gradient
    assert gh[1, 16:].abs().sum() == 0 and gh[1, 15].abs().sum() > 0


def test_fp32_tight():
    h, w, labels = _data(dtype=torch.float32, seed=1)
    loss, n = lm_loss_sum(h, w, labels, chunk_tokens=10)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = _plain(h, w, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_bf16_against_plain_bf16_path():
    """bf16: both paths round the matmul output to bf16 before the fp32 loss, so the loss agrees to fp32
    summation order (~1e-6 relative); gradients are bf16 matmuls of the same fp32 softmax cast to bf16,
    agreeing to bf16 rounding (we allow 1e-2 relative norm; seen: loss 2e-7, grad_h 7e-6, grad_W 2e-3,
    the last because we accumulate grad_W over chunks in fp32 where the plain path has one bf16 matmul)."""
    h, w, labels = _data(dtype=torch.bfloat16, seed=2, H=64, V=3000)
    loss, n = lm_loss_sum(h, w, labels, chunk_tokens=16)
    loss.backward()
    gh, gw = h.grad.float(), w.grad.float()
    h.grad = w.grad = None
    ref = _plain(h, w, labels)
    ref.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5
    for a, b in ((gh, h.grad.float()), (gw, w.grad.float())):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


def test_bf16_gradient_is_scaled_in_fp32():
    """The caller divides the summed loss by the step's token count: that 1/n must reach the bf16 gradient
    unrounded, else every gradient carries the same rounding error of 1/n in bf16 (+0.14% at n = 3000)."""
    h, w, labels = _data(dtype=torch.bfloat16, seed=7, H=64, V=3000)
    scale = 1.0 / 3000  # bf16 holds 1/3000 only to 0.14%
    loss, _ = lm_loss_sum(h, w, labels, chunk_tokens=16)
    (loss * scale).backward()
    scaled = h.grad.double()
    h.grad = None
    lm_loss_sum(h, w, labels, chunk_tokens=16)[0].backward()
    unscaled = h.grad.double() * scale
    keep = unscaled != 0
    bias = (scaled[keep] / unscaled[keep]).mean().item() - 1
    assert abs(bias) < 3e-4, bias


def test_frozen_lm_head_gets_no_gradient_and_hidden_still_does():
    h, w, labels = _data(w_grad=False, seed=3)
    loss, _ = lm_loss_sum(h, w, labels, chunk_tokens=5)
    loss.backward()
    assert w.grad is None
    gh = h.grad.clone()
    h.grad = None
    _plain(h, w, labels).backward()
    torch.testing.assert_close(gh, h.grad, rtol=1e-10, atol=1e-12)


def test_no_grad_computes_the_loss_only_and_double_backward_is_refused():
    h, w, labels = _data(seed=8)
    with torch.no_grad():
        loss, _ = lm_loss_sum(h, w, labels, chunk_tokens=5)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _plain(h.detach(), w.detach(), labels))
    loss, _ = lm_loss_sum(h, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through it only once"):
        loss.backward()


def test_micro_batches_sum_to_the_whole():
    h, w, labels = _data(seed=4)
    whole, n = lm_loss_sum(h, w, labels)
    parts = [lm_loss_sum(h[i : i + 1], w, labels[i : i + 1]) for i in range(h.shape[0])]
    torch.testing.assert_close(sum(p[0] for p in parts), whole)
    assert sum(p[1] for p in parts) == n


def test_no_trained_tokens_gives_zero_and_backward_works():
    h, w, labels = _data(seed=5)
    labels[:] = -100
    loss, n = lm_loss_sum(h, w, labels)
    assert loss.item() == 0 and n.item() == 0
    loss.backward()
    assert h.grad.abs().sum() == 0


def test_eval_sums_count_correct_tokens():
    h, w, labels = _data(seed=6, V=50)
    logits = h @ w.t()
    # make some predictions right: set those labels to the argmax
    pred = logits[:, :-1].argmax(-1)
    labels[:, 1::2] = torch.where(labels[:, 1::2] != -100, pred[:, ::2], labels[:, 1::2])
    loss, n, correct = lm_eval_sums(h, w, labels, chunk_tokens=9)
    t = labels[:, 1:]
    keep = t != -100
    assert correct.item() == (pred[keep] == t[keep]).sum().item() > 0
    torch.testing.assert_close(loss, _plain(h.detach(), w.detach(), labels))
    assert n.item() == keep.sum().item()


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_full_logits_are_never_materialised():
    B, L, V, chunk = 2, 64, 5000, 8
    h, w, labels = _data(B=B, L=L, V=V, dtype=torch.float32, seed=7)
    labels[:] = torch.randint(0, V, labels.shape)
    with _LargestTensor() as probe:
        loss, _ = lm_loss_sum(h, w, labels, chunk_tokens=chunk)
        loss.backward()
    assert probe.largest <= max(chunk * V, w.numel(), h.numel()), probe.largest
    with _LargestTensor() as probe:
        _plain(h, w, labels).backward()
    assert probe.largest >= B * (L - 1) * V  # the probe does see full logits when they exist


def test_bad_shapes_are_reported():
    h, w, labels = _data()
    with pytest.raises(ValueError, match=r"labels shape \[3, 28\] does not match hidden_states \[3, 29\]"):
        lm_loss_sum(h, w, labels[:, 1:])
    with pytest.raises(ValueError, match=r"lm_head_weight must be \[vocab, 24\]"):
        lm_loss_sum(h, w[:, :5], labels)
    with pytest.raises(ValueError, match="hidden_states must be"):
        lm_loss_sum(h[0], w, labels)
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
        lm_loss_sum(h, w, labels, chunk_tokens=0)


def test_tiny_model_loss_and_lora_grads_equal_transformers_loss(tiny_ckpt):
    torch.manual_seed(0)
    m = load_model(tiny_ckpt, device="cpu", lora={"rank": 4, "alpha": 8})
    for n_, p in m.named_parameters():
        if "lora_B" in n_:
            with torch.no_grad():
                p.normal_(0, 0.05)
    m.train()
    ids = torch.randint(0, 201088, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100
    out = m.model(input_ids=ids)
    loss_sum, n = lm_loss_sum(out.last_hidden_state, m.lm_head.weight, labels, chunk_tokens=8)
    (loss_sum / n).backward()
    ours = {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    ref = m(input_ids=ids, labels=labels).loss
    ref.backward()
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-6, atol=1e-6)
    for k, p in m.named_parameters():
        if p.requires_grad:
            # fp32 sums taken in another order differ by a few ulps of the tensor's largest entry (1.3e-7 on
            # an entry near zero with transformers 5.24); a wrong or missing term is off by orders more.
            atol = 1e-5 * float(p.grad.abs().max())
            torch.testing.assert_close(ours[k], p.grad, rtol=1e-5, atol=atol, msg=lambda s, k=k: f"{k}: {s}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_real_vocab_bf16_memory_and_values():
    """gpt-oss sizes on CUDA: 2,048 tokens, H 2,880, V 201,088, bf16. The chunked loss matches the plain one
    and its extra memory stays near chunk x V x 6 bytes while the plain loss needs tokens x V x 6+."""
    torch.manual_seed(0)
    N, H, V, chunk = 2048, 2880, 201088, 512
    h = (torch.randn(1, N, H, device="cuda")).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device="cuda") * 0.02).bfloat16()
    labels = torch.randint(0, V, (1, N), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, n = lm_loss_sum(h, w, labels, chunk_tokens=chunk)
    loss.backward()
    torch.cuda.synchronize()
    ours_extra = torch.cuda.max_memory_allocated() - base
    gh = h.grad.float()
    h.grad = None
    torch.cuda.reset_peak_memory_stats()
    ref = _plain(h, w, labels)
    ref.backward()
    torch.cuda.synchronize()
    plain_extra = torch.cuda.max_memory_allocated() - base
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-4
    assert ((gh - h.grad.float()).norm() / h.grad.float().norm()).item() < 1e-2
    assert ours_extra < chunk * V * 8 + 4 * N * H * 2, ours_extra
    assert plain_extra > N * V * 6, plain_extra
