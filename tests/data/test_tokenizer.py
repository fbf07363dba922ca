"""The real o200k_harmony vocabulary, offline, hash-checked."""

import subprocess
import sys

import pytest

from gptoss_tune.data import tokenizer
from gptoss_tune.errors import UserError


def test_materialized_vocab_has_official_hash(tmp_path):
    f = tokenizer.materialize(tmp_path)
    assert tokenizer.sha256_of(f) == tokenizer.O200K_SHA256
    assert (tmp_path / tokenizer.TIKTOKEN_CACHE_KEY).read_bytes() == f.read_bytes()
    assert tokenizer.TIKTOKEN_CACHE_KEY == "fb374d419588a4632f3f557e76b4b70aebbca790"


def test_wrong_hash_is_refused(tmp_path):
    src = tokenizer.quicktok_vocab_path().read_bytes()
    bad = bytearray(src)
    bad[10] ^= 0x01  # flip one bit inside the first token's bytes
    p = tmp_path / "bad.vocab"
    p.write_bytes(bytes(bad))
    with pytest.raises(UserError, match="SHA-256"):
        tokenizer.materialize(tmp_path / "out", source=p)
    assert not (tmp_path / "out" / tokenizer.HARMONY_FILE).exists()


def test_harmony_and_tiktoken_work_without_network(tmp_path):
    # A fresh cache and proxies that lead nowhere: any download attempt would fail.
    code = (
        "from gptoss_tune.data.tokenizer import harmony_encoding, tiktoken_encoding\n"
        "from openai_harmony import Conversation, Message, Role\n"
        "enc = harmony_encoding(); tk = tiktoken_encoding()\n"
        "c = Conversation.from_messages([Message.from_role_and_content(Role.USER, 'Hello world')])\n"
        "ids = enc.render_conversation_for_completion(c, Role.ASSISTANT)\n"
        "assert ids[:2] == [200006, 1428] and ids[-1] == 173781, ids\n"
        "assert tk.encode('Hello world') == [13225, 2375] and tk.n_vocab == 201088\n"
        "assert sorted(enc.stop_tokens()) == [200002, 200007, 200012]  # a set in openai-harmony: any order\n"
        "print('ok')\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "GPTOSS_TUNE_CACHE": str(tmp_path / "cache"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-tiktoken-cache"),
    }
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_an_official_file_the_user_already_has_is_used_as_it_is(tmp_path, monkeypatch):
    import os

    mine = tmp_path / "mine"
    tokenizer.materialize(mine)  # byte-identical to the official o200k_base.tiktoken, under both names
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(mine))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(mine))
    monkeypatch.setenv("GPTOSS_TUNE_CACHE", str(tmp_path / "ours"))
    tokenizer.ensure_vocab.cache_clear()
    try:
        assert tokenizer.ensure_vocab() == mine / tokenizer.HARMONY_FILE
        assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(mine) and os.environ["TIKTOKEN_CACHE_DIR"] == str(mine)
        assert not (tmp_path / "ours").exists()  # nothing was written
        # a file with the wrong hash is not used: the verified copy from quicktok is
        (mine / tokenizer.HARMONY_FILE).write_bytes(b"not the vocabulary\n")
        tokenizer.ensure_vocab.cache_clear()
        ours = tmp_path / "ours" / "tiktoken"
        assert tokenizer.ensure_vocab() == ours / tokenizer.HARMONY_FILE
        assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(ours)
        assert tokenizer.sha256_of(ours / tokenizer.HARMONY_FILE) == tokenizer.O200K_SHA256
    finally:
        tokenizer.ensure_vocab.cache_clear()
