"""The model stage: a gpt-oss checkpoint -> transformers' GptOssForCausalLM with our MXFP4 experts and
sink attention swapped in and LoRA attached (`load_model`)."""
