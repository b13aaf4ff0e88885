"""The trainer on a tiny Llama: padding invariance, learning, the hook protocol, lm-eval on the output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from unisd import config as cfg
from unisd import engine, hardware, losses, rollout, train as tr
from unisd.data import Example
from unisd.plugin import Plugin, PluginInfo
from unisd.rollout import Rollout


def _config(model: Path, data: Path, out: Path, **kw) -> cfg.TrainConfig:
    plugins = tuple(kw.pop("plugins", ()))
    settings = dict(max_steps=2, batch_size=2, max_new_tokens=8, lr=1e-3)
    settings.update(kw)
    return cfg.resolve("", plugins, {}, model=str(model), data=str(data), out=str(out), **settings)


def _fixed_batch(run: tr.Run, prompts: list[str], completions: list[list[int]]) -> tr.Batch:
    examples = [Example(p, "42", "because") for p in prompts]
    batch = tr.Batch(list(range(len(prompts))), examples,
                     {"student": prompts, "teacher": [tr.teacher_prompt(e) for e in examples]})
    width = max(len(c) for c in completions)
    pad = run.tokenizer.pad_token_id
    batch.tokens = torch.tensor([c + [pad] * (width - len(c)) for c in completions])
    batch.mask = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in completions])
    return batch


def test_padding_gives_the_same_per_example_loss_as_unbatched(tiny_model, tiny_data, tmp_path):
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out"))
    prompts = ["What is two plus two?", "Name a colour of the sky, please, in one word only."]
    completions = [[40, 41, 42, 43, 44, 45], [50, 51]]
    batched = tr.forward(run, _fixed_batch(run, prompts, completions), run.policy.initial)
    for i in range(2):
        alone = tr.forward(run, _fixed_batch(run, [prompts[i]], [completions[i]]), run.policy.initial)
        n = len(completions[i])
        torch.testing.assert_close(batched.divergence[i, :n], alone.divergence[0, :n], rtol=1e-4, atol=1e-6)
        for view in ("student", "teacher"):
            torch.testing.assert_close(batched.logps[view][i, :n], alone.logps[view][0, :n], rtol=1e-4, atol=1e-5)
        assert batched.divergence[i, n:].abs().sum() == 0  # padding contributes nothing
        per_example = losses.weighted_mean(alone.divergence, alone.mask)
        torch.testing.assert_close(per_example, alone.divergence[0, :n].mean())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_teacher_on_the_student_prompt_gives_zero_divergence_at_step_0(tiny_model, tiny_data, tmp_path, lora):
    """--bf16: the frozen teacher computes exactly as the student does (its logits are not rounded to bf16), so
    scored under the student's own prompt before any update the divergence is 0 within fp32 round-off.

    Where the CPU computes bf16 natively the two passes differ by more (divergence 7.1e-5, log-probabilities
    4.0e-4 at most, measured on a Xeon with AMX, full and LoRA alike; where bf16 is emulated they agree to 1e-6):
    that CPU's kernels sum the student's forward, which keeps its graph, in another order than the no-grad
    teacher's. There the bounds are looser, and still well under what logits rounded to bf16 would give (up to 1.8e-2
    on this tiny model's log-probabilities)."""
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out", bf16=True, lora=lora))
    prompts = ["What is two plus two?", "Name a colour of the sky, please, in one word only."]
    batch = _fixed_batch(run, prompts, [[40, 41, 42, 43, 44, 45], [50, 51]])
    batch.prompts["teacher"] = list(batch.prompts["student"])
    out = tr.forward(run, batch, run.policy.initial)
    assert out.mask.sum() == 8
    exact = not hardware.fast_bf16_cpu()
    assert float(out.divergence.detach().abs().max()) < (1e-6 if exact else 5e-4)
    torch.testing.assert_close(out.logps["teacher"], out.logps["student"].detach(), rtol=0,
                               atol=1e-5 if exact else 2e-3)


def test_bf16_computes_in_bf16_with_fp32_master_weights(tiny_model, tiny_data, tmp_path, monkeypatch):
    """--bf16 on CPU: same loss as fp32 up to bf16 rounding; fp32 weights and grads; bf16 teacher and sampler."""
    prompts = ["What is two plus two?", "Name a colour of the sky, please, in one word only."]
    completions = [[40, 41, 42, 43, 44, 45], [50, 51]]
    exact = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "fp32"))
    fast = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "bf16", bf16=True))
    # the frozen teacher holds its linear layers in bf16 (what autocast computes them in), the rest in fp32
    held = {n: p.dtype for n, p in fast.policy.initial.model.named_parameters()}
    assert {n for n, d in held.items() if d == torch.bfloat16} == {n for n in held if n.endswith("proj.weight")}
    reference = tr.forward(exact, _fixed_batch(exact, prompts, completions), exact.policy.initial)
    seen: dict[str, set[torch.dtype]] = {"student": set(), "teacher": set()}  # the views may take several forwards
    for name, model in (("student", fast.policy.model), ("teacher", fast.policy.initial.model)):
        model.model.layers[0].mlp.register_forward_hook(lambda m, i, o, name=name: seen[name].add(o.dtype))
    got = tr.forward(fast, _fixed_batch(fast, prompts, completions), fast.policy.initial)
    assert seen == {"student": {torch.bfloat16}, "teacher": {torch.bfloat16}}  # both models' layer computed in bf16
    assert not torch.equal(got.divergence, reference.divergence)
    torch.testing.assert_close(got.divergence, reference.divergence, rtol=0.1, atol=0.02)
    losses.weighted_mean(got.divergence, got.mask).backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in fast.policy.model.parameters())
    dtypes: list[set[torch.dtype]] = []
    real_sample = rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda model, *a, **k: dtypes.append({p.dtype for p in model.parameters()})
                        or real_sample(model, *a, **k))
    fast.optimizer.zero_grad()
    assert torch.isfinite(torch.tensor(tr.step(fast)["loss"]))
    assert dtypes == [{torch.bfloat16}]  # sampled from a whole bf16 copy


def test_loss_decreases_on_a_repeated_batch(tiny_model, tmp_path, monkeypatch):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "What is two plus two?", "answer": "four", "rationale": "2+2=4"}) + "\n")
    fixed = Rollout(torch.tensor([[40, 41, 42, 43, 44, 2]]), torch.ones(1, 6), torch.tensor([False]))
    monkeypatch.setattr(tr.Policy, "sample", lambda *a, **k: fixed)
    run = tr.prepare(_config(tiny_model, data, tmp_path / "out", batch_size=1, lr=1e-3, max_steps=3))
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0)  # constant lr for the check
    seen = [tr.step(run)["loss"] for _ in range(3)]
    assert seen[0] > seen[1] > seen[2], seen


class Probe(Plugin):
    """Touches every hook and changes the step in a way the test can see."""

    calls: list[str] = []
    teacher_uses: list[int] = []  # Counting.uses after each step

    def setup(self, run):
        Probe.calls.append("setup")

    def views(self, batch):
        Probe.calls.append("views")
        return {"probe.view": list(batch.prompts["student"])}

    def teacher(self, run):
        Probe.calls.append("teacher")
        return Counting(run.policy.initial.model)

    def token_loss(self, D, out):
        Probe.calls.append("token_loss")
        assert "probe.view" in out.logps and out.logps["probe.view"].shape == out.mask.shape
        rows = torch.arange(1, D.shape[0] + 1, dtype=D.dtype)[:, None]
        return D * 0 + rows  # sequence b has divergence b + 1 everywhere

    def weights(self, out):
        Probe.calls.append("weights")
        w = torch.zeros(out.mask.shape[0], 1)
        w[0] = 0.01  # only the first sequence counts; a weighted mean, whatever the weights' scale
        return w

    def aux_losses(self, out):
        Probe.calls.append("aux_losses")
        out.metrics["probe/seen"] = 1.0
        return {"probe_aux": torch.tensor(0.25)}

    def after_step(self, run):
        Probe.calls.append("after_step")
        Probe.teacher_uses.append(Counting.uses)

    def state_dict(self):
        return {"calls": len(Probe.calls)}


class Counting:
    """A teacher that counts how often its decoder is asked for."""

    uses = 0

    def __init__(self, inner):
        self.inner = inner

    def get_decoder(self):
        Counting.uses += 1
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_every_hook_is_called_and_its_result_used(tiny_model, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr("unisd.plugin.discover", lambda: {"probe": PluginInfo("probe", "tests", "0", Probe)})
    Probe.calls.clear()
    Probe.teacher_uses.clear()
    Counting.uses = 0
    out = tr.train(_config(tiny_model, tiny_data, tmp_path / "run", plugins=("probe",)), echo=lambda m: None)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["distill"] == pytest.approx(1.0)  # weights kept only sequence 0, whose value is 1
        assert m["probe_aux"] == pytest.approx(0.25) and m["loss"] == pytest.approx(1.25)
        assert m["probe_aux/share"] == pytest.approx(0.2)  # the auxiliary term's share of the loss
        assert m["probe/seen"] == 1.0
    assert 0 < Probe.teacher_uses[0] < Probe.teacher_uses[1]  # the teacher hook's model scored every step
    assert Probe.calls[0] == "setup"
    assert Probe.calls.count("after_step") == 2
    assert Probe.calls[-6:] == ["views", "teacher", "token_loss", "weights", "aux_losses", "after_step"]
    state = torch.load(next((out / "checkpoints").glob("step-*")) / "state.pt", weights_only=False)
    assert state["plugins"]["probe"]["calls"] > 0
    # the plugin's distribution and version are part of the run's identity and of its record
    assert state["identity"]["plugins"]["probe"] == {"version": "0", "options": {}}
    assert set(state["identity"]) == {"settings", "plugins", "data", "total_steps", "world_size"}
    assert (state["identity"]["total_steps"], state["identity"]["world_size"]) == (2, 1)
    record = json.loads((out / "unisd.json").read_text())
    assert record["plugins"] == {"probe": {"distribution": "tests", "version": "0", "options": {}}}


def test_end_to_end_output_loads_in_lm_eval(tiny_model, tiny_data, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = tr.train(_config(tiny_model, tiny_data, tmp_path / "run", max_steps=2), echo=lambda m: None)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "generation_config.json", "unisd.json", "README.md", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    assert "\n# run\n" in (out / "README.md").read_text()  # the card is titled with the run's folder name
    record = json.loads((out / "unisd.json").read_text())
    assert record["steps"] == 2 and record["config"]["data"] == str(tiny_data) and len(record["data_fingerprint"]) == 64
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "loss", "step_time_s", "distill"} <= set(m) for m in metrics)
    # the saved weights are the trained ones, not the initial ones
    trained, initial = load_file(str(out / "model.safetensors")), load_file(str(tiny_model / "model.safetensors"))
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": "Which animal barks?", "choices": ["cat", "dog"], "label": 1},
            {"question": "Where do fish live?", "choices": ["water", "trees"], "label": 0}]
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny.yaml").write_text(
        "task: unisd_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'tiny.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    result = simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32", tasks=["unisd_tiny"],
                             task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                             device="cpu", batch_size=2)
    # lm-eval loads the trained weights: its accuracy is the one they give, choice by choice
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

    def loglikelihood(context: str, continuation: str) -> float:
        ctx, cont = tok(context)["input_ids"], tok(context + continuation)["input_ids"][len(tok(context)["input_ids"]):]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1]
        return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum())

    picked = [max(range(2), key=lambda i: loglikelihood(f"Question: {r['question']}\nAnswer:", f" {r['choices'][i]}"))
              for r in rows]
    expected = sum(p == r["label"] for p, r in zip(picked, rows)) / len(rows)
    assert result["results"]["unisd_tiny"]["acc,none"] == expected
    assert result["n-samples"]["unisd_tiny"]["effective"] == 2


def test_prepare_recomputes_activations_without_reentrant_checkpointing(tiny_model, tiny_data, tmp_path):
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out"))
    layers = [m for m in run.policy.model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert layers and run.policy.model.is_gradient_checkpointing
    assert all(m._gradient_checkpointing_func.keywords == {"use_reentrant": False} for m in layers)


def test_keep_activations_trains_the_same_weights_without_recomputing(tiny_model, tiny_data, tmp_path):
    """--keep-activations turns the checkpointing off and changes nothing else: two steps give the weights two
    steps with recomputation give (up to the order of float sums), and the weights moved."""
    initial = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters()}
    weights = {}
    for keep in (False, True):
        run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / str(keep), keep_activations=keep))
        assert run.policy.model.is_gradient_checkpointing is not keep
        for _ in range(2):
            tr.step(run)
        weights[keep] = {n: p.detach().clone() for n, p in run.policy.model.named_parameters()}
    assert weights[False].keys() == weights[True].keys() == initial.keys()
    assert all(torch.allclose(weights[False][n], weights[True][n], atol=1e-6) for n in initial)
    assert max(float((weights[True][n] - initial[n]).abs().max()) for n in initial) > 1e-4


def test_a_missing_vllm_is_said_before_anything_loads(tmp_path, monkeypatch):
    def missing() -> None:
        raise cfg.ConfigError("no engine")

    monkeypatch.setattr(engine, "require", missing)
    config = _config(tmp_path / "no-model", tmp_path / "no-data.jsonl", tmp_path / "out", rollout="vllm")
    with pytest.raises(cfg.ConfigError, match="no engine"):
        tr.prepare(config)


def test_train_speaks_through_its_echo(tiny_model, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": "What is two plus two?", "answer": "4"}, {"prompt": "Say " + "very " * 400, "answer": "x"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    said: list[str] = []
    tr.train(_config(tiny_model, data, tmp_path / "run", max_steps=1, batch_size=1, max_prompt_tokens=200),
             echo=said.append)
    assert said[0] == "warning: dropped 1 of 2 examples whose prompts exceed 200 tokens"
    assert len(said) == 2 and said[1].startswith("step 1/1: loss ")  # no bar off a terminal: a line instead
    assert capsys.readouterr().out == ""


def test_step_times_each_phase_over_every_micro_batch(tiny_model, tiny_data, tmp_path, monkeypatch):
    class Clock:  # each reading is one second after the last
        now = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            cls.now += 1.0
            return cls.now

    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out", grad_accum=2))
    monkeypatch.setattr(tr, "time", Clock)
    metrics = tr.step(run)
    # readings: start; per micro-batch before rollout, forward, backward and after it; optimizer; after_step
    assert {k: metrics[k] for k in ("rollout_s", "forward_s", "backward_s", "optimizer_s", "after_step_s",
                                    "step_time_s")} == {"rollout_s": 2.0, "forward_s": 2.0, "backward_s": 2.0,
                                                        "optimizer_s": 1.0, "after_step_s": 1.0, "step_time_s": 13.0}
    assert metrics["lr"] == pytest.approx(1e-3)  # the rate step 1 used: no warm-up in 2 steps, the cosine's start


def test_lora_teacher_is_the_student_with_its_adapter_off(tiny_model, tiny_data, tmp_path):
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out", lora=True, lora_r=4, lora_alpha=8))
    teacher = run.policy.initial
    assert teacher.adapter_off and teacher.model is run.policy.model  # no second copy


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
def test_forward_divergence_is_the_named_one_between_student_and_teacher_prompts(tiny_model, tiny_data, tmp_path,
                                                                                  divergence):
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out", divergence=divergence, alpha=0.3))
    prompt, completion = "What is two plus two?", [40, 41, 42, 43]
    batch = _fixed_batch(run, [prompt], [completion])
    got = tr.forward(run, batch, run.policy.initial).divergence[0]

    def logits(model, text: str) -> torch.Tensor:  # the model's logits at the completion's positions, by hand
        ids = tr.render(run.tokenizer, text)
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids + completion])).logits[0, len(ids) - 1:-1]

    student = logits(run.policy.model, prompt)
    teacher = logits(run.policy.initial.model, batch.prompts["teacher"][0])
    want = losses.pick(divergence, 0.3)(student, teacher, run.config.loss_temperature)
    torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-6)


def test_warmup_is_its_share_of_the_schedule(tiny_model, tiny_data, tmp_path):
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out", max_steps=8, warmup_ratio=0.25))
    factors = [run.scheduler.lr_lambdas[0](s) for s in range(4)]
    assert factors[:3] == [0.0, 0.5, 1.0] and factors[3] < 1.0  # 2 warm-up steps, then the cosine decay


def test_a_step_without_a_counted_token_moves_nothing(tiny_model, tiny_data, tmp_path, monkeypatch):
    """Every completion masked (e.g. --mask-truncated and all cut off): the step still runs backward, with a
    zero gradient, so that data-parallel ranks all join the gradient reduction."""
    empty = Rollout(torch.tensor([[40, 41], [42, 43]]), torch.zeros(2, 2), torch.tensor([True, True]))
    monkeypatch.setattr(tr.Policy, "sample", lambda *a, **k: empty)
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out"))
    metrics = tr.step(run)
    assert (metrics["completion_tokens"], metrics["loss"], metrics["grad_norm"], metrics["skipped"]) == (0, 0, 0, False)


def test_the_student_samples_from_its_own_rendered_prompts(tiny_model, tiny_data, tmp_path, monkeypatch):
    calls: list[tuple] = []
    fixed = Rollout(torch.tensor([[40, 41], [42, 43]]), torch.ones(2, 2), torch.tensor([False, False]))
    monkeypatch.setattr(tr.Policy, "sample", lambda *args, **kwargs: calls.append((args, kwargs)) or fixed)
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out", top_k=7))
    rendered = {tuple(tr.render(run.tokenizer, e.prompt)) for e in run.examples}
    tr.step(run)
    ((args, kwargs),) = calls
    assert args[0] is run.policy and args[2:] == (run.config.max_new_tokens, run.config.temperature, run.config.top_p)
    assert len(args[1]) == 2 and {tuple(ids) for ids in args[1]} < rendered  # two examples' chat-rendered prompts
    assert kwargs == {"top_k": 7}


def test_an_epoch_is_the_examples_over_the_global_batch(tiny_model, tiny_data, tmp_path):
    run = tr.prepare(_config(tiny_model, tiny_data, tmp_path / "out", max_steps=0, batch_size=1, grad_accum=2))
    assert len(run.kept) > 2 and run.total_steps == -(-len(run.kept) // 2)
