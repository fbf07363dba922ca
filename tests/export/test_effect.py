"""The effect retained of merged exports and the choice of the MXFP4 re-quantiser (export/effect.py).

The reference is computed independently: stock transformers' GptOssForCausalLM for the base and the
exported directories, stock PEFT on the exported adapter for the tuned model, the prompts rendered with
openai-harmony here.
"""

from __future__ import annotations

import pytest
import torch
from helpers.reference import stock_model
from helpers.runs import make_run_dir
from safetensors.torch import load_file, save_file

from gptoss_tune.export.effect import BUILTIN_PROMPTS
from gptoss_tune.export.exporter import export_run

POSITIONS = 96


def _quiet(*_a, **_k):
    pass


def _prompt_ids(n_positions=POSITIONS):
    from openai_harmony import Conversation, HarmonyEncodingName, Message, Role, SystemContent, load_harmony_encoding

    enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    out, n = [], 0
    for p in BUILTIN_PROMPTS:
        conv = Conversation.from_messages(
            [
                Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
                Message.from_role_and_content(Role.USER, p),
            ]
        )
        ids = list(enc.render_conversation_for_completion(conv, Role.ASSISTANT))[: n_positions - n]
        out.append(ids)
        n += len(ids)
        if n >= n_positions:
            break
    return out


@torch.no_grad()
def _stock_log_probs(model, prompts):
    return [torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0].float(), -1) for p in prompts]


def _kl(ref, other):
    kl = sum(float((a.exp() * (a - b)).sum()) for a, b in zip(ref, other))
    return kl / sum(a.shape[0] for a in ref)


def _experts_only_run(tmp_path, tiny_ckpt, scale, seed=0):
    """A run whose LoRA is on the experts only, with B drawn at `scale` (the update's size)."""
    run = make_run_dir(tmp_path / f"run{seed}", tiny_ckpt, lora={"rank": 4, "alpha": 8, "attention": []}, seed=seed)
    f = run / "checkpoints/step-00000010/adapter.safetensors"
    st = load_file(f)
    g = torch.Generator().manual_seed(seed)
    for k in st:
        if "lora_B" in k:
            st[k] = torch.randn(st[k].shape, generator=g) * scale
    save_file(st, f)
    return run


def _relative_update(run, tiny_ckpt):
    from gptoss_kernels.mxfp4 import dequantize

    st = load_file(run / "checkpoints/step-00000010/adapter.safetensors")
    base = {}
    for f in tiny_ckpt.glob("*.safetensors"):
        base.update(load_file(f))
    num = den = 0.0
    for k in st:
        if k.endswith("_lora_A"):
            name = k[: -len("_lora_A")]
            d = 2.0 * (st[name + "_lora_B"] @ st[k])
            w = dequantize(base[name + "_blocks"], base[name + "_scales"], torch.float32)
            num, den = num + float(d.norm() ** 2), den + float(w.norm() ** 2)
    return (num / den) ** 0.5


def test_effect_retained_matches_stock_transformers_and_peft(tiny_ckpt, tmp_path):
    from peft import PeftModel

    run = make_run_dir(tmp_path / "run", tiny_ckpt, lora={"rank": 2, "alpha": 4}, seed=4)
    export_run(run, "adapter", tmp_path / "adapter", progress=_quiet)
    reps = {
        fmt: export_run(run, fmt, tmp_path / fmt, progress=_quiet, effect_positions=POSITIONS)
        for fmt in ("merged-bf16", "merged-mxfp4")
    }
    prompts = _prompt_ids()
    tuned = _stock_log_probs(
        PeftModel.from_pretrained(stock_model(tiny_ckpt), str(tmp_path / "adapter")).eval(), prompts
    )
    kl_base = _kl(tuned, _stock_log_probs(stock_model(tiny_ckpt), prompts))
    for fmt, rep in reps.items():
        e = rep["effect"]
        kl_export = _kl(tuned, _stock_log_probs(stock_model(tmp_path / fmt), prompts))
        assert e["positions"] == POSITIONS and e["source"] == "built-in prompts"
        assert e["kl_tuned_base"] == pytest.approx(kl_base, rel=1e-3)
        # merged-bf16 keeps ~all of it (KL 5.6e-6 here): at that level the two implementations' own rounding
        # (logits within 1e-5) shows, so the KLs agree to 1e-3 of the effect, not relatively
        assert e["kl_tuned_export"] == pytest.approx(kl_export, abs=1e-3 * kl_base)
        assert e["effect_retained"] == pytest.approx(1 - kl_export / kl_base, abs=1e-3)
        assert 0.5 < e["effect_retained"] < 1  # a large random LoRA: mostly kept, not all (rounding)
    assert reps["merged-bf16"]["effect"]["effect_retained"] > 0.99
    rq = reps["merged-mxfp4"]["requantization"]  # the candidate measured before writing is the export written
    chosen = rq["candidates"][rq["method"]]["effect_retained"]
    assert chosen == pytest.approx(reps["merged-mxfp4"]["effect"]["effect_retained"], abs=1e-6)


def test_small_update_chosen_requantiser_beats_the_openai_rule_and_never_harms(tiny_ckpt, tmp_path):
    """Expert updates of relative norm ~1e-3 (what a short fine-tune at a small lr gives): OpenAI's rule
    puts the export further from the tuned model than the base is; the chosen re-quantiser never does."""
    run = _experts_only_run(tmp_path, tiny_ckpt, scale=4e-4)
    rho = _relative_update(run, tiny_ckpt)
    assert 3e-4 < rho < 3e-3, rho
    rep = export_run(run, "merged-mxfp4", tmp_path / "mx", progress=_quiet, effect_positions=POSITIONS)
    rq, e = rep["requantization"], rep["effect"]
    cand = {m: c["effect_retained"] for m, c in rq["candidates"].items()}
    assert cand["openai"] < -1.0, cand  # the previous export: several times further than the untouched base
    assert rq["method"] in ("keep", "mse") and e["effect_retained"] >= 0.0
    assert e["effect_retained"] > cand["openai"] + 1.0
    assert e["effect_retained"] == pytest.approx(cand[rq["method"]], abs=1e-6)  # the export is the candidate measured
    assert e["warning"] and "--format adapter" in e["warning"] and "--adapter" in e["warning"]
    forced = export_run(
        run, "merged-mxfp4", tmp_path / "mx-openai", requant="openai", progress=_quiet, effect_positions=POSITIONS
    )
    assert forced["requantization"]["chosen_by"] == "--requant"
    assert forced["effect"]["effect_retained"] == pytest.approx(cand["openai"], abs=1e-6)


def test_zero_expert_update_gives_the_base_experts_byte_for_byte(tiny_ckpt, tmp_path):
    run = _experts_only_run(tmp_path, tiny_ckpt, scale=0.0)
    for requant in ("auto", "stochastic", "openai"):
        rep = export_run(run, "merged-mxfp4", tmp_path / requant, requant=requant, progress=_quiet, effect_positions=16)
        assert rep["effect"]["effect_retained"] is None and rep["effect"]["kl_tuned_base"] == 0.0
        a, b = {}, {}
        for f in tiny_ckpt.glob("*.safetensors"):
            a.update({k: v for k, v in load_file(f).items() if ".experts." in k})
        for f in (tmp_path / requant).glob("*.safetensors"):
            b.update({k: v for k, v in load_file(f).items() if ".experts." in k})
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (requant, k)


def test_held_out_prefers_the_runs_validation_tokens(tiny_ckpt, tmp_path):
    """A run trained from a recipe: the held-out positions are its validation rows' trained tokens."""
    import json
    from pathlib import Path

    from gptoss_tune.export.effect import held_out
    from gptoss_tune.export.exporter import AdapterSource
    from gptoss_tune.train.recipe import load_recipe
    from gptoss_tune.train.stream import load_train_data

    repo = Path(__file__).resolve().parents[2]
    run = make_run_dir(tmp_path / "run", tiny_ckpt)
    recipe = load_recipe(repo / "recipes/tiny-demo.yaml", [f"model.path={tiny_ckpt}", f"output_dir={run}"])
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    src = AdapterSource(run / "checkpoints/step-00000010")
    held = held_out(src, max_positions=300)
    assert held.source == "validation" and held.positions == 300
    rows = load_train_data(recipe).validation
    ids, pos, sel = held.rows[0]
    assert ids.tolist() == rows[0]["input_ids"] and pos.tolist() == rows[0]["position_ids"]
    labels = rows[0]["labels"]
    assert sel.tolist() == [t for t in range(len(labels) - 1) if labels[t + 1] != -100][: len(sel)]
    # no validation data: a sample of the training rows, said so
    recipe.data.validation = None
    recipe.data.val_fraction = 0.0
    recipe.early_stopping.enabled = False
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    held = held_out(src, max_positions=50)
    assert held.source == "training sample" and "seen in training" in held.note
    assert json.dumps(held.describe())


def test_cli_prints_one_effect_line_and_takes_the_requant_flag(tiny_ckpt, tmp_path, capsys):
    from gptoss_tune.cli.main import main

    run = _experts_only_run(tmp_path, tiny_ckpt, scale=4e-4)
    args = ["export", str(run), "--format", "merged-mxfp4", "--out", str(tmp_path / "o"), "--effect-positions", "16"]
    assert main([*args, "--requant", "keep"]) == 0
    out = capsys.readouterr().out
    assert "experts re-quantised with 'keep' (--requant)" in out
    assert len([line for line in out.splitlines() if line.strip().startswith("effect retained ")]) == 1
    assert "WARNING: this merged-mxfp4 export keeps only" in out and "--format adapter" in out
    # OpenAI's rule on so small an update does damage (the 34x KL): the warning says it is worse than the base
    assert main([*args, "--requant", "openai", "--force"]) == 0
    out = capsys.readouterr().out
    assert "further from the tuned model than the untouched base is" in out and "--format adapter" in out
    with pytest.raises(SystemExit) as exc:  # argparse's own one-line refusal
        main([*args, "--requant", "gptq"])
    assert exc.value.code == 2
