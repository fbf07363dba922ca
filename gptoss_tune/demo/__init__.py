"""`make demo`: every stage on the embedded tiny gpt-oss."""
