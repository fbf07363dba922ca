"""The data stage: data files -> harmony-rendered token rows with loss masks, packed."""
