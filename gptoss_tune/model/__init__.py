"""The model stage: a gpt-oss checkpoint -> transformers' GptOssForCausalLM, experts kept in MXFP4.

Takes a checkpoint directory (or a hub id in the local cache) in the published layout; gives the model
with our `MXFP4Experts` and sink attention swapped in and LoRA attached (`loader.load_model`).

    config       the published configurations, token ids, projection names
    checkpoint   finding a checkpoint, reading config.json, indexing its safetensors (no tensor data)
    tiny         writing tiny checkpoints in exactly the published layout (tests, the demo)
    experts      MXFP4Experts: packed uint8 blocks + E8M0 scales, per-expert LoRA, reference/Triton backends;
                 DenseExperts: dense bf16 experts kept as they are (serving a merged-bf16 export)
    attention    the sink-aware attention registered with transformers (flex on CUDA, math on the CPU)
    lora         LoraSettings and attaching LoRA (PEFT on attention, ours on the experts)
    adapter      our adapter directory (adapter.json + adapter.safetensors): save, read, load onto a model
    loader       load_model
    summary      what a loaded model holds (`gptoss-tune inspect`)
"""
