"""Attention masks for packed rows: no token attends across an example boundary.

transformers builds block-diagonal masks from restarting position_ids only when the model hands the
position_ids to its mask functions. GptOssModel (transformers 5.23) does not: it calls
`create_causal_mask` / `create_sliding_window_causal_mask` without them, so a packed row passed with
position_ids alone attends across examples (measured: the loss of the 2nd and 3rd example of a packed
row differed from their separate losses from the first token on). It also skips packed-sequence
detection whenever a KV cache exists, and `use_cache` defaults to True.

GptOssModel accepts a ready mask per layer type as `attention_mask` (a dict, as `generate` passes), so
`packed_attention_masks` builds them with transformers' own mask functions, this time given the
position_ids, for whatever attention implementation the model is configured with (eager, sdpa, flex).
Call the model with `use_cache=False`. Note that GptOssForCausalLM's own load-balancing loss cannot
take a dict mask: with `output_router_logits=True`, call `model.model(...)` (the decoder) and apply
`lm_head` and the losses yourself, using `token_mask` from batching.collate for the balancing loss.
"""

from __future__ import annotations

import torch


def packed_attention_masks(model, position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> dict:
    """{"full_attention": mask, "sliding_attention": mask} for a packed batch of position_ids [B, T]."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = model.config
    B, T = position_ids.shape
    dtype = dtype or next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    # Only the shape, dtype and device of inputs_embeds are read.
    shape_only = torch.empty((B, T, 0), dtype=dtype, device=position_ids.device)
    kwargs = dict(config=config, inputs_embeds=shape_only, attention_mask=None, past_key_values=None, position_ids=position_ids)
    return {
        "full_attention": create_causal_mask(**kwargs),
        "sliding_attention": create_sliding_window_causal_mask(**kwargs),
    }
