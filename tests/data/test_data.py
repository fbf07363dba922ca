"""load_data and `gptoss-tune render`: formats, files, splits, overlong examples, bad input, speed."""

import json
from pathlib import Path

import pytest

from gptoss_tune.cli.main import main
from gptoss_tune.data.batching import IGNORE_INDEX
from gptoss_tune.data.pipeline import load_data
from gptoss_tune.data.rendering import render_example
from gptoss_tune.data.settings import DataSettings
from gptoss_tune.data.sources import read_examples
from gptoss_tune.errors import UserError

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"

PC = {"prompt": "What is the range of the Velora Fold?", "completion": "Up to 40 km."}
CHAT = {
    "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "thinking": "Greet.", "content": "Hello!"}]
}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8"
    )
    return path


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf-cache"


def test_sample_data_rows_follow_the_batching_contract(cache):
    s = DataSettings(train="train.jsonl", validation="validation.jsonl", max_seq_len=1024)
    b = load_data(s, seed=0, base_dir=SAMPLE, cache_dir=cache)
    r = b.report
    assert r["train"]["examples"] == 240 and r["validation"]["examples"] == 60
    assert r["train"]["skipped"] == r["train"]["dropped"] == r["train"]["truncated"] == 0
    assert r["validation_from"] == "file"
    for rows, split in ((b.train, "train"), (b.validation, "validation")):
        assert len(rows) == r[split]["rows"]
        assert sum(len(x["input_ids"]) for x in rows) == r[split]["tokens"]
        assert sum(sum(lab != IGNORE_INDEX for lab in x["labels"]) for x in rows) == r[split]["trained_tokens"]
        assert sum(x["position_ids"].count(0) for x in rows) == r[split]["examples"]
        for x in rows:
            assert len(x["input_ids"]) == len(x["labels"]) == len(x["position_ids"]) <= 1024
            assert all(lab == IGNORE_INDEX or lab == t for lab, t in zip(x["labels"], x["input_ids"]))
    assert r["train"]["fill"] > 0.9  # packing fills rows
    # every example is packed exactly as render_example renders it
    first = json.loads((SAMPLE / "train.jsonl").read_text().splitlines()[0])
    ex = render_example(first)
    packed_examples = []
    for x in b.train:
        starts = [i for i, p in enumerate(x["position_ids"]) if p == 0] + [len(x["input_ids"])]
        packed_examples += [x["input_ids"][a:e] for a, e in zip(starts, starts[1:])]
    assert ex.input_ids in packed_examples


def test_padding_mode_one_example_per_row(cache):
    b = load_data(DataSettings(train=str(SAMPLE / "validation.jsonl"), packing=False), seed=0, cache_dir=cache)
    assert len(b.train) == 60 and all(x["position_ids"] == list(range(len(x["input_ids"]))) for x in b.train)


def test_val_fraction_is_deterministic_for_a_seed(cache):
    s = DataSettings(train=str(SAMPLE / "validation.jsonl"), val_fraction=0.2, packing=False)
    a, b, c = (load_data(s, seed=k, cache_dir=cache) for k in (1, 1, 2))
    assert len(a.validation) == 12 and len(a.train) == 48
    assert a.validation == b.validation and a.train == b.train
    assert a.validation != c.validation
    held = {tuple(x["input_ids"]) for x in a.validation}
    assert not held & {tuple(x["input_ids"]) for x in a.train}
    assert a.report["validation_from"] == "0.2 of train, held out with seed 1"


def test_train_rows_are_shuffled_by_seed_only(cache):
    s = DataSettings(train=str(SAMPLE / "validation.jsonl"), packing=False)
    a, b, c = (load_data(s, seed=k, cache_dir=cache).train for k in (0, 0, 1))
    assert a == b and a != c and sorted(map(str, a)) == sorted(map(str, c))


def test_overlong_truncate_drop_and_no_silent_empty_target(tmp_path, cache):
    long_prompt = {"prompt": "word " * 300, "completion": "ok"}
    long_answer = {"prompt": "q", "completion": "word " * 300}
    f = write_jsonl(tmp_path / "d.jsonl", [PC, long_prompt, long_answer])
    b = load_data(DataSettings(train=str(f), max_seq_len=200), seed=0, cache_dir=cache)
    t = b.report["train"]
    assert (t["examples"], t["truncated"], t["dropped_no_target"], t["dropped_overlong"]) == (2, 1, 1, 0)
    assert t["dropped_reasons"] == [
        f"{f}:2: no trained token within the first 200 tokens (max_seq_len); the target was cut away, so it is left out"
    ]
    assert all(len(x["input_ids"]) <= 200 for x in b.train)
    b = load_data(DataSettings(train=str(f), max_seq_len=200, overlong="drop"), seed=0, cache_dir=cache)
    t = b.report["train"]
    assert (t["examples"], t["truncated"], t["dropped_overlong"]) == (1, 0, 2)


def test_formats_parquet_json_array_and_saved_dataset(tmp_path, cache):
    import datasets

    rows = [PC, PC | {"completion": "About 40 km."}]
    want = [render_example(r).input_ids for r in rows]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "dd"))
    for name in ("a.json", "a.parquet", "saved", "dd"):
        got = [e.input_ids for e in read_examples(tmp_path / name, cache_dir=cache).examples]
        assert got == want, name
    assert len(read_examples(tmp_path / "dd", role="validation", cache_dir=cache).examples) == 1


def test_table_rows_lose_the_nulls_arrow_adds(tmp_path, cache):
    """Arrow merges differently shaped objects into one struct, filling the gaps with nulls."""
    import datasets

    def tools(name, prop):
        return [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": "",
                    "parameters": {"type": "object", "properties": {prop: {"type": "string"}}},
                },
            }
        ]

    rows = [
        {
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "tools": tools("f", "x"),
        },
        {
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "tools": tools("g", "y"),
        },
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    got = [e.input_ids for e in read_examples(tmp_path / "t.parquet", cache_dir=cache).examples]
    assert got == [render_example(r).input_ids for r in rows]


def test_rendering_is_cached_by_datasets(tmp_path, cache):
    f = write_jsonl(tmp_path / "d.jsonl", [PC, CHAT])
    read_examples(f, cache_dir=cache)
    n_files = len(list(cache.rglob("*.arrow")))
    assert n_files >= 2  # the text table and the rendered one
    read_examples(f, cache_dir=cache)
    assert len(list(cache.rglob("*.arrow"))) == n_files  # same settings: read back, nothing new
    read_examples(f, cache_dir=cache, train_on="all")
    assert len(list(cache.rglob("*.arrow"))) == n_files + 1  # other settings: rendered again


BAD_LINES = [
    ("{not json", "d.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    (
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "d.jsonl:2: messages[0].role: unknown role 'bot'",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
        "d.jsonl:2: messages[1]: an assistant message needs content or tool_calls (it has neither)",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
                {"role": "assistant", "content": "y"},
            ]
        },
        "d.jsonl:2: messages[1].tool_call_id: 'c1' matches no earlier assistant tool call",
    ),
    (
        PC | {"reasoning_effort": "extreme"},
        "d.jsonl:2: reasoning_effort: unknown reasoning effort 'extreme'; expected low, medium or high",
    ),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path, cache, line, message):
    f = write_jsonl(tmp_path / "d.jsonl", [PC, line, CHAT])
    with pytest.raises(UserError) as e:
        load_data(DataSettings(train=str(f)), seed=0, cache_dir=cache)
    assert str(e.value).startswith(f"{tmp_path}/{message}"), str(e.value)
    assert str(e.value).endswith("fix it, or set data.on_bad_line: skip to skip bad records")


def test_on_bad_line_skip_reports_how_many_and_why(tmp_path, cache):
    f = write_jsonl(tmp_path / "d.jsonl", [PC] + [line for line, _ in BAD_LINES] + ["", CHAT])
    b = load_data(DataSettings(train=str(f), on_bad_line="skip"), seed=0, cache_dir=cache)
    t = b.report["train"]
    assert (t["records"], t["skipped"], t["examples"]) == (7, 5, 2)  # the blank line is no record
    assert [why.split(": ", 1)[0] for why in t["skipped_reasons"]] == [f"{f}:{n}" for n in range(2, 7)]
    for n, (why, (_, message)) in enumerate(zip(t["skipped_reasons"], BAD_LINES), start=2):
        assert why.startswith(f"{tmp_path}/{message.replace('d.jsonl:2:', f'd.jsonl:{n}:')}"), why


def test_empty_missing_and_all_bad_files(tmp_path, cache):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match=r"empty\.jsonl: the file is empty \(no examples\)"):
        load_data(DataSettings(train="empty.jsonl"), seed=0, base_dir=tmp_path, cache_dir=cache)
    with pytest.raises(UserError, match=r"blank\.jsonl: the file is empty \(no examples\)"):
        load_data(DataSettings(train="blank.jsonl"), seed=0, base_dir=tmp_path, cache_dir=cache)
    with pytest.raises(UserError) as e:
        load_data(DataSettings(train="nope.jsonl"), seed=0, base_dir=tmp_path, cache_dir=cache)
    assert (
        str(e.value) == f"data.train: {tmp_path}/nope.jsonl does not exist (relative paths are taken from {tmp_path})"
    )
    write_jsonl(tmp_path / "t.jsonl", [PC])
    with pytest.raises(UserError, match=r"^data\.validation: .*/val\.jsonl does not exist"):
        load_data(DataSettings(train="t.jsonl", validation="val.jsonl"), seed=0, base_dir=tmp_path, cache_dir=cache)
    write_jsonl(tmp_path / "bad.jsonl", ["[1]"])
    with pytest.raises(
        UserError,
        match=r"bad\.jsonl: no usable examples; all 1 records were bad, the first: .*bad\.jsonl:1: expected a JSON object",
    ):
        load_data(DataSettings(train="bad.jsonl", on_bad_line="skip"), seed=0, base_dir=tmp_path, cache_dir=cache)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"x\.csv: unknown data format '\.csv'"):
        load_data(DataSettings(train="x.csv"), seed=0, base_dir=tmp_path, cache_dir=cache)
    with pytest.raises(UserError, match=r"^data\.tools\[0\]\.function\.name"):
        load_data(
            DataSettings(train="t.jsonl", tools=[{"type": "function", "function": {"name": "a b"}}]),
            seed=0,
            base_dir=tmp_path,
            cache_dir=cache,
        )


# --- gptoss-tune render -------------------------------------------------------------------------


def test_render_json_prints_input_ids_and_loss_mask(tmp_path, capsys):
    f = write_jsonl(tmp_path / "d.jsonl", [PC, CHAT])
    assert main(["render", str(f), "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(o) for o in out] == [{"input_ids", "loss_mask"}] * 2
    for o, ex in zip(out, (PC, CHAT)):
        r = render_example(ex)
        assert o == {"input_ids": r.input_ids, "loss_mask": r.loss_mask}
    assert main(["render", str(f), "--json", "--n", "1", "--reasoning-effort", "high"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and json.loads(out[0])["input_ids"] == render_example(PC, reasoning_effort="high").input_ids


def test_render_text_marks_the_trained_part(capsys):
    assert main(["render", str(SAMPLE / "train.jsonl"), "--n", "2", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("── example ") == 2
    assert "<|start|>assistant⟦<|channel|>" in out and "<|return|>⟧" in out
    assert "240 examples" in out and "0 truncated, 0 dropped" in out and "0 of 240 records skipped" in out


def test_render_bad_line_is_one_line_no_traceback(tmp_path, capsys):
    f = write_jsonl(tmp_path / "d.jsonl", [PC, "{oops"])
    assert main(["render", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gptoss-tune render: error: {f}:2: not valid JSON") and "pass --skip-bad-lines" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert main(["render", str(f), "--skip-bad-lines", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 records skipped" in out and f"skipped {f}:2: not valid JSON" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--max-seq-len", "5"],
            "gptoss-tune render: error: --max-seq-len: input should be greater than or equal to 16 (got 5)\n",
        ),
        (["--n", "-1"], "gptoss-tune render: error: --n: the number of examples to print must be 0 or more, got -1\n"),
    ],
)
def test_render_bad_flags_are_one_line(flags, message, capsys):
    assert main(["render", str(SAMPLE / "validation.jsonl"), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err == message and captured.out == ""


def test_jsonl_with_a_byte_order_mark_and_crlf_line_ends(tmp_path, cache):
    """Files saved by Windows editors start with a UTF-8 BOM and end lines with CRLF; both are not data."""
    f = tmp_path / "win.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(PC).encode() + b"\r\n" + json.dumps(CHAT).encode() + b"\r\n")
    got = [e.input_ids for e in read_examples(f, cache_dir=cache).examples]
    assert got == [render_example(PC).input_ids, render_example(CHAT).input_ids]


def test_format_report_lists_a_few_reasons_and_counts_the_rest(tmp_path, cache):
    from gptoss_tune.data.pipeline import format_report

    long_answer = {"prompt": "q", "completion": "word " * 300}
    long_answer2 = {"prompt": "q", "completion": "words " * 300}
    f = write_jsonl(tmp_path / "d.jsonl", [PC] + [line for line, _ in BAD_LINES] + [long_answer, long_answer2, CHAT])
    b = load_data(
        DataSettings(train=str(f), on_bad_line="skip", max_seq_len=100, overlong="drop"), seed=0, cache_dir=cache
    )
    lines = format_report(b.report, listed=2).splitlines()
    assert (
        lines[0].startswith(f"train: 2 examples from {f} (9 records, 5 skipped)")
        and "2 dropped (2 overlong" in lines[0]
    )
    assert [line.split(":", 1)[0] for line in lines[1:]] == [f"  skipped {f}"] * 2 + ["  ... and 3 more skipped"] + [
        f"  dropped {f}"
    ] * 2
    assert lines[1].startswith(f"  skipped {f}:2: not valid JSON") and lines[4].startswith(f"  dropped {f}:7: ")
