"""Rows -> model batches. The contract between the data stage and the training loop.

A row is a dict of equal-length int lists, at most max_seq_len long:
    input_ids     token ids
    labels        the token id where the loss falls, -100 elsewhere (unshifted: transformers shifts)
    position_ids  0, 1, 2, ... restarting at 0 at the start of every packed example

`collate` pads a list of rows to one length. Packed batches carry NO attention_mask: the model's
default attention (`gptoss_sink`, gptoss_tune/attention.py) reads example boundaries from the restarting
position_ids, so attention never crosses examples (transformers' own "eager" gpt-oss attention does not:
GptOssModel never hands position_ids to its mask builders); padding becomes one more pseudo-example
(positions restart at 0) with labels -100. Padding-mode batches carry an attention_mask (1 real, 0 pad) and position_ids 0..n.
`token_mask` (1 for real tokens) is not a model input: the training loop uses it for the
load-balancing loss and token counts, and removes it before calling the model.
"""

from __future__ import annotations

import torch

from gptoss_tune.model.config import PAD_ID

IGNORE_INDEX = -100  # labels where no loss falls (torch cross_entropy's and transformers' ignore_index)


def collate(
    rows: list[dict], packing: bool, pad_id: int = PAD_ID, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    length = max(len(r["input_ids"]) for r in rows)
    if pad_to is not None:
        length = max(length, pad_to)
    B = len(rows)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, length), dtype=torch.long)
    token_mask = torch.zeros((B, length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        position_ids[i, :n] = torch.tensor(r["position_ids"])
        position_ids[i, n:] = torch.arange(length - n)
        token_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "token_mask": token_mask}
    if not packing:
        batch["attention_mask"] = token_mask.clone()
    return batch
