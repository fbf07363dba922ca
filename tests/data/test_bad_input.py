"""Hostile and careless data: one line naming file:line and what to do, or skipped with on_bad_line: skip;
and the report's warnings (empty completions, duplicates, validation examples that are training examples)."""

import json
import random
import time

import pytest
import regex

from gptoss_tune.cli.main import main
from gptoss_tune.data.harmony import check_strings
from gptoss_tune.data.pipeline import format_report, load_data
from gptoss_tune.data.rendering import render_example
from gptoss_tune.data.settings import DataSettings
from gptoss_tune.data.sources import read_examples
from gptoss_tune.errors import UserError

PC = {"prompt": "What is the range of the Velora Fold?", "completion": "Up to 40 km."}
PC2 = {"prompt": "And its weight?", "completion": "14 kg."}
DEEP = "[" * 100_000 + "]" * 100_000
SURROGATE = b'{"prompt": "a\\ud800b", "completion": "x"}'  # a lone escape: valid JSON, not text
CJK = json.dumps({"prompt": "\u6f22" * 1_050_000, "completion": "x"}, ensure_ascii=False).encode()
LATIN1 = b'{"prompt": "caf\xe9", "completion": "x"}'  # Latin-1, not UTF-8
EMPTY = b'{"prompt": "", "completion": ""}'


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf-cache"


def write(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        (DEEP.encode(), "the example: nested more than 64 levels deep (objects and lists within each other); flatten it"),
        (SURROGATE, r"prompt: a lone UTF-16 surrogate (\ud800) at character 2 is not text"),
        (CJK, "prompt: 1,050,000 letters in a row from character 1 (more than data.max_unbroken_chars = 10,000); "),
        (LATIN1, "not valid UTF-8 (byte 0xe9 at column 16); save the file as UTF-8"),
        (EMPTY, "prompt and completion are empty: there is nothing to learn from this example; remove it"),
        (json.dumps({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]}).encode(),
         "every message is empty"),
    ],
    ids=["deep", "surrogate", "cjk-1M", "not-utf8", "empty", "empty-chat"],
)  # fmt: skip
def test_bad_line_is_one_line_naming_the_line_or_skipped(tmp_path, cache, line, message):
    f = write(tmp_path / "d.jsonl", [PC, PC2, line, PC])
    with pytest.raises(UserError) as e:
        load_data(DataSettings(train=str(f)), seed=0, cache_dir=cache)
    assert str(e.value).startswith(f"{f}:3: {message}") and "\n" not in str(e.value), str(e.value)
    b = load_data(DataSettings(train=str(f), on_bad_line="skip"), seed=0, cache_dir=cache)
    t = b.report["train"]
    assert (t["records"], t["skipped"], t["examples"]) == (4, 1, 3)
    assert t["skipped_reasons"][0].startswith(f"{f}:3: {message}")


def test_cli_render_bad_lines_exit_2_without_traceback(tmp_path, capfd):
    f = write(tmp_path / "d.jsonl", [PC, DEEP.encode(), SURROGATE, CJK, LATIN1, EMPTY])
    assert main(["render", str(f)]) == 2
    err = capfd.readouterr().err
    assert err.startswith(f"gptoss-tune render: error: {f}:2: the example: nested") and err.count("\n") == 1, err
    assert "(4 more bad records in this file)" in err and "pass --skip-bad-lines" in err
    assert main(["render", str(f), "--skip-bad-lines", "--color", "never", "--n", "0"]) == 0
    out = capfd.readouterr()
    assert "5 of 6 records skipped" in out.out and "Traceback" not in out.err and "panicked" not in out.err
    assert [line.split(": ", 1)[0] for line in out.out.splitlines() if "skipped /" in line] == [
        f"  skipped {f}:{n}" for n in range(2, 7)
    ]


def test_invalid_utf8_names_the_line_after_a_bom_and_multibyte_text(tmp_path, cache):
    f = tmp_path / "b.jsonl"
    good = json.dumps({"prompt": "Größe – 漢字", "completion": "ok"}, ensure_ascii=False).encode()
    f.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n" + b'{"prompt": "\xe6\xbc", "completion": "x"}\r\n' + good + b"\n")
    with pytest.raises(UserError, match=rf"^{f}:2: not valid UTF-8 \(byte 0xe6 at column 13\)"):
        read_examples(f, cache_dir=cache)
    src = read_examples(f, cache_dir=cache, on_bad_line="skip")
    assert [e.where for e in src.examples] == [f"{f}:1: ", f"{f}:3: "]
    want = render_example(json.loads(good)).input_ids
    assert [e.input_ids for e in src.examples] == [want, want]  # the BOM is not data; multibyte text intact


def test_unbroken_run_limit_is_exact_configurable_and_counts_what_the_tokenizer_splits_on():
    check_strings({"prompt": "x" * 100}, max_unbroken_chars=100)
    check_strings({"prompt": ("x" * 100 + " ") * 50 + "!" * 100 + "1" + "\n" * 100}, max_unbroken_chars=100)
    for run, kind in (
        ("x" * 101, "letters"),
        ("!" * 100 + "\n", "punctuation characters and line breaks"),
        (" " * 101, "whitespace characters"),
    ):
        with pytest.raises(
            UserError,
            match=rf"^f:3: messages\[1\]\.content: 101 {kind} in a row from character 4 \(more than --lim = 100\)",
        ):
            check_strings(
                {"messages": [{}, {"content": "ab9" + run + "9"}]}, "f:3: ", max_unbroken_chars=100, limit_name="--lim"
            )
    check_strings({"prompt": "x" * 1000}, max_unbroken_chars=None)  # fmt: skip


def test_no_piece_of_the_o200k_pretokenizer_escapes_the_limit():
    """The limit bounds what is quadratic in openai-harmony: the pieces of the o200k split pattern
    (taken from tiktoken, the independent reference). A string whose longest piece is more than 4
    characters longer than the limit is always refused, on text mixing every class of character."""
    from gptoss_tune.data.tokenizer import tiktoken_encoding

    pieces = regex.compile(tiktoken_encoding()._pat_str)
    alphabet = [
        "a",
        "Z",
        "é",
        "ß",
        "漢字",
        "ไทย",
        "\u0301",
        "\u0e34",
        "!?",
        ".",
        "-/",
        " ",
        "\t",
        "\n",
        "\r",
        "7",
        "٣",
        "½",
        "'s",
        "'ll",
    ]
    rng = random.Random(0)
    for _ in range(500):
        s = "".join(rng.choice(alphabet) * rng.randint(1, 12) for _ in range(rng.randint(1, 40)))
        longest = max(len(p) for p in pieces.findall(s))
        if longest > 5:
            with pytest.raises(UserError, match="in a row"):
                check_strings(s, max_unbroken_chars=longest - 5)
    check_strings("Ordinary text, with 12 digits and punctuation; it's fine.", max_unbroken_chars=11)


def test_the_limit_keeps_rendering_linear_and_the_check_is_fast():
    # openai-harmony alone: 10k CJK characters in a row take ~0.5-1.3 s, 1.05 M panic. The check on 1 M
    # characters (a long run and a long ordinary text) takes milliseconds.
    t = time.perf_counter()
    for s in ("\u6f22" * 1_000_000, "hello world, " * 80_000, "a1" * 500_000):
        try:
            check_strings({"prompt": s})
        except UserError:
            pass
    assert time.perf_counter() - t < 5
    with pytest.raises(UserError, match="letters in a row"):
        render_example({"prompt": "\u6f22" * 1_050_000, "completion": "x"})
    r = render_example({"prompt": "\u6f22" * 2_000, "completion": "x"}, max_unbroken_chars=2_000)
    assert len(r.input_ids) > 1_000


def test_render_flag_raises_the_limit(tmp_path, capsys):
    f = write(tmp_path / "d.jsonl", [{"prompt": "y" * 200, "completion": "x"}])
    assert main(["render", str(f), "--max-unbroken-chars", "100"]) == 2
    assert "raise --max-unbroken-chars" in capsys.readouterr().err
    assert main(["render", str(f), "--max-unbroken-chars", "200", "--n", "0"]) == 0


def test_report_counts_and_lists_empty_completions_duplicates_and_validation_in_train(tmp_path, cache):
    empty_answer = {"prompt": "Say nothing.", "completion": ""}
    same_as_pc = {"prompt": [{"role": "user", "content": PC["prompt"]}], "completion": PC["completion"]}
    t = write(tmp_path / "t.jsonl", [PC, PC2, empty_answer, PC, same_as_pc, PC2 | {"completion": "15 kg."}])
    v = write(tmp_path / "v.jsonl", [PC2 | {"completion": "About 14 kg."}, PC2])
    b = load_data(DataSettings(train=str(t), validation=str(v)), seed=0, cache_dir=cache)
    tr, va = b.report["train"], b.report["validation"]
    assert tr["empty_completions"] == 1 and tr["empty_completion_reasons"] == [f"{t}:3"]
    assert tr["duplicates"] == 2 and tr["duplicate_reasons"] == [f"{t}:4 repeats {t}:1", f"{t}:5 repeats {t}:1"]
    assert (va["in_train"], va["compared"], va["same_as_train"]) == (1, 2, False)
    assert va["in_train_reasons"] == [f"{v}:2 is also {t}:2"]
    assert tr["examples"] == 6  # reported, not removed
    text = format_report(b.report)
    assert "  1 with an empty completion, 2 the same as an earlier example" in text
    assert f"  empty completion: {t}:3" in text and f"  duplicate: {t}:5 repeats {t}:1" in text
    assert "  1 of 2 validation examples are also training examples\n" in text + "\n"
    assert f"  also in train: {v}:2 is also {t}:2" in text

    b = load_data(DataSettings(train=str(t), validation=str(t)), seed=0, cache_dir=cache)
    va = b.report["validation"]
    assert (va["in_train"], va["same_as_train"]) == (6, True)
    assert "6 of 6 validation examples are also training examples (it is the training data" in format_report(b.report)

    clean = load_data(DataSettings(train=str(v)), seed=0, cache_dir=cache)
    assert clean.report["train"]["duplicates"] == clean.report["train"]["empty_completions"] == 0
    assert len(format_report(clean.report).splitlines()) == 1


def test_recipe_level_tools_are_checked_once_as_the_recipes(tmp_path, cache):
    f = write(tmp_path / "d.jsonl", [PC])
    tools = [{"type": "function", "function": {"name": "f", "description": "a\ud800", "parameters": {}}}]
    with pytest.raises(UserError, match=r"^data\.tools\[0\]\.function\.description: a lone UTF-16 surrogate"):
        load_data(DataSettings(train=str(f), tools=tools, on_bad_line="skip"), seed=0, cache_dir=cache)
