"""`make demo` / `python -m gptoss_tune.demo`: every stage on the embedded tiny gpt-oss (steps), ending
with the export served and asked one question through the openai client (ask). The demo's recipe and
sample data ship with the package (recipes/ and data/ here)."""
