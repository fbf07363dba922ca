"""The data stage: data files -> harmony-rendered token rows with loss masks, packed.

Takes the recipe's `data:` section (DataSettings); gives training and validation rows and a report
(`pipeline.load_data`). Rows follow the contract in `batching`.

    settings     DataSettings (the `data:` section)
    tokenizer    the real o200k_harmony vocabulary, offline, checked against its SHA-256
    harmony      OpenAI-shaped messages -> an openai-harmony Conversation (shared with the server)
    rendering    one example -> token ids and the loss mask (exactly the tokens the model writes)
    sources      data files -> rendered examples, through `datasets` and its cache
    packing      examples -> rows: overlong handling, best-fit packing
    batching     rows -> model batches (IGNORE_INDEX, position ids that keep packed examples apart)
    pipeline     the whole stage: read, render, hold out validation, fit, pack, report
"""
