"""Independent references the tests compare against."""

import torch


def stock_model(path, dtype=torch.float32):
    """transformers' own GptOssForCausalLM loading the directory (it dequantises MXFP4 on the CPU)."""
    import transformers
    from transformers import GptOssForCausalLM

    transformers.logging.set_verbosity_error()
    model = GptOssForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    # transformers 5.17 leaves the dequantised experts in bf16 whatever dtype is asked for (5.23 honours it):
    # the reference computes in the one dtype asked for, so that an fp32 comparison means fp32 on both sides.
    return model.to(dtype)
