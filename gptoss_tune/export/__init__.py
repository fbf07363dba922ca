"""The export stage: a run's checkpoint -> an adapter, a merged bf16 or a merged MXFP4 model.

Takes a run directory (or a checkpoint / adapter directory) and a format; gives an export directory that
stock PEFT, transformers and vLLM load, with tokenizer files, a model card and export_report.json
(`exporter.export_run`).

    exporter     export_run: the command's work, the output directory, the summary
    peft_format  our adapter tensors <-> PEFT's layout (attention LoRA, 3-D expert LoRA)
    card         the model card
    drift        how far an export's logits are from the tuned model's
    hf_tokenizer tokenizer.json and the chat template for exported models
    vllm_route   the adapter as vLLM's gpt-oss LoRA loader needs it (both expert slots) and its command
    out_dir      --out checks, the temporary (stale ones removed), a full disk as one line
    base_check   the --base checkpoint's tensors checked before merging
"""

FORMATS = ("adapter", "merged-bf16", "merged-mxfp4")
