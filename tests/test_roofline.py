"""The roofline benchmark: its FLOP and byte counts against hand counts, and one quick run on the tiny model."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from bench import roofline

ROOT = Path(__file__).resolve().parents[1]
# 2 layers, hidden 32, MLP 64, 4 heads of 8, 2 KV heads, vocabulary 300: per layer q 32x32, k and v 32x16,
# o 32x32, gate and up 32x64, down 64x32, i.e. 1024 + 512 + 512 + 1024 + 3 x 2048 = 9216 linear weights
TINY = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


def test_linear_weights_by_hand():
    assert roofline.linear_params(roofline.Shape.of(TINY)) == 2 * 9216 == 18432


def test_step_flops_by_hand():
    # the student ran rows of 10 and 12 real tokens padded to 12, the teacher one row of 20; 8 logits each
    found = roofline.step_flops(TINY, {"student": [(10, 12), (12, 12)], "teacher": [(20, 20)]},
                                {"student": 8, "teacher": 8})
    # linear 2 x 18432 x (10 + 12) = 811008; attention 4 x 2 layers x 4 heads x 8 x (10^2 + 12^2) = 62464;
    # head 2 x 32 x 300 x 8 = 153600; padded: 2 x 18432 x 24 = 884736 and 256 x (144 + 144) = 73728
    assert found["student"] == {"flops": 811008 + 62464 + 153600, "padded_flops": 884736 + 73728 + 153600}
    # 2 x 18432 x 20 = 737280, 256 x 400 = 102400, no padding
    assert found["teacher"] == {"flops": 737280 + 102400 + 153600, "padded_flops": 737280 + 102400 + 153600}
    # backward: 2 x (linear + head) + 2 x attention; recomputed: the student's layers and head, the teacher's head
    assert found["backward"] == {"flops": 2 * (811008 + 153600) + 2 * 62464,
                                 "padded_flops": 2 * (884736 + 153600) + 2 * 73728,
                                 "recompute_flops": 811008 + 62464 + 153600 + 153600}
    lora = roofline.step_flops(TINY, {"student": [(10, 12), (12, 12)]}, {"student": 8}, lora=True)
    # frozen weights: only the activations' gradients (1x) through the linear layers and the head
    assert lora["backward"]["flops"] == (811008 + 153600) + 2 * 62464
    assert lora["backward"]["recompute_flops"] == 811008 + 62464 + 153600  # no teacher head in the chunks


@pytest.mark.parametrize("tied", [True, False])
def test_a_decoding_step_reads_every_weight_but_the_input_embedding(tied):
    # 18432 linear + 5 norms of 32 + the head's 300 x 32 = 28192, tied or not
    assert roofline.decode_weights(TINY) == 18432 + 5 * 32 + 300 * 32 == 28192
    model = LlamaForCausalLM(LlamaConfig(**{**TINY.to_dict(), "tie_word_embeddings": tied}))
    held = sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter
    assert roofline.decode_weights(TINY) == held - (0 if tied else 300 * 32)


def test_decode_bytes_by_hand():
    # 8 steps of 2 sequences after 10 prompt positions, fp32: the weights 8 times; the KV cache, 2 (k, v) x 2 layers
    # x 2 KV heads x 8 x 4 bytes = 256 bytes a position, read at 10, 11, ... 17 positions: 108 per sequence
    assert roofline.decode_bytes(TINY, 2, 10, 8, 4) == {"weights": 28192 * 4 * 8, "kv_cache": 2 * 256 * 108}


def test_the_rollouts_roofline_by_hand():
    """2 rows, 10-token prompts, 3 tokens at a peak of 1 FLOP/s and a bandwidth that reads the fp32 weights
    (28192 x 4 = 112768 bytes) in 118600 s: the prefill is FLOP-bound, the first decoding step bound by the bytes,
    the second by the FLOPs."""
    bandwidth = 112768 / 118600
    found = roofline.rollout_bound(TINY, 2, 10, 3, 4, 1.0, bandwidth)
    # prefill: linear 2 x 18432 x 20 = 737280, attention 256 x (100 + 100) = 51200, the head 2 x 32 x 300 x 2 = 38400
    assert found["prefill_flops"] == found["prefill_s"] == 737280 + 51200 + 38400
    # step t attends to 10 + t positions: 2 x 28192 x 2 = 112768 weight FLOPs, 4 x 2 x 4 x 8 x (10 + t) x 2 attention
    steps = [112768 + 256 * 11 * 2, 112768 + 256 * 12 * 2]  # 118400, 118912
    assert found["decode_flops"] == sum(steps) and found["flops_bound_steps"] == 1
    assert found["decode_s"] == pytest.approx(118600 + 118912)
    # the KV cache: 2 (k, v) x 2 layers x 2 KV heads x 8 x 4 bytes = 256 bytes a position, (10 + t) x 2 rows
    kv = [max(f, 118600 + 256 * (10 + t) * 2 / bandwidth) for t, f in ((1, steps[0]), (2, steps[1]))]
    assert found["with_kv_cache_s"] == pytest.approx(found["prefill_s"] + sum(kv))
    many = roofline.rollout_bound(TINY, 64, 10, 3, 4, 1.0, bandwidth)  # 64 rows: every step's FLOPs outweigh its bytes
    assert many["flops_bound_steps"] == 2 and many["decode_s"] == many["decode_flops"]


def test_a_decoding_step_at_the_sweeps_rates_by_hand():
    # 2 rows at 1 FLOP/s: 2 x 2 x 18432 linear FLOPs over both layers and 2 x 2 x 32 x 300 = 38400 in the head;
    # the head twice as fast halves its share
    shapes = [{"m": m, "k": k, "n": n, "flops_per_s": 2.0 if name == "head" else 1.0}
              for (m, k, n), name in roofline.gemms(TINY, 2, 2).items()]
    assert roofline.decode_step_at_kernels(TINY, 2, shapes) == 4 * 18432 + 38400 / 2
    assert roofline.decode_step_at_kernels(TINY, 2, shapes[1:]) is None  # q/o not timed: no figure


def test_the_gemms_of_a_pass_name_coinciding_shapes_together():
    assert roofline.gemms(TINY, 100, 16) == {(100, 32, 32): "q/o", (100, 32, 16): "k/v", (100, 32, 64): "gate/up",
                                             (100, 64, 32): "down", (16, 32, 300): "head"}


def test_the_sweep_times_the_forward_and_both_gradients_at_every_shape():
    found = roofline.measure_matmuls(TINY, [("fp32", 100, 16)], None, "cpu", 0.001)["fp32"]
    assert [(r["m"], r["k"], r["n"]) for r in found["shapes"]] == list(roofline.gemms(TINY, 100, 16))
    for r in found["shapes"]:
        assert min(r["flops_per_s"], r["input_grad_flops_per_s"], r["weight_grad_flops_per_s"]) > 0
    assert found["backward_peak_flops_per_s"] == max(map(roofline.backward_rate, found["shapes"]))
    assert found["peak_flops_per_s"] == max(r["flops_per_s"] for r in found["shapes"])
    # a result measured before the backward's products were timed keeps its forward peak and has no backward peak
    old = {"fp32": {"shapes": [{k: v for k, v in r.items() if "grad" not in k} for r in found["shapes"]]}}
    assert "backward_peak_flops_per_s" not in roofline.measure_matmuls(TINY, [], old, "cpu", 0.001)["fp32"]
    assert roofline.kernel_table({"matmul": old}) == ""
    assert roofline.kernel_table({"matmul": {"fp32": found}}).count("| fp32 |") == len(found["shapes"])


def test_the_backward_against_its_own_kernels_by_hand():
    """Equal FLOPs through a 1- and a 3-FLOP/s product take 1 + 1/3 s per 2 FLOPs: 1.5 FLOP/s. A backward of 100
    gradient FLOPs at 25 FLOP/s and 50 recomputed at 50 FLOP/s needs 5 s; done in 10 s it reaches half of that."""
    assert roofline.backward_rate({"input_grad_flops_per_s": 1.0, "weight_grad_flops_per_s": 3.0}) == 1.5
    assert roofline.kernel_fraction({"flops": 100.0, "recompute_flops": 50.0, "seconds": 10.0}, 50.0, 25.0) == 0.5
    assert roofline.kernel_fraction({"flops": 100.0, "seconds": 8.0}, 50.0, 25.0) == 0.5


def test_a_quick_run_reports_every_phase_as_a_fraction_of_its_bound(tiny_model, tmp_path):
    out = tmp_path / "roofline.json"
    assert roofline.main(["--model", str(tiny_model), "--quick", "--batch", "2", "--completion", "4", "--prompt", "16",
                          "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"command", "git_sha", "versions", "machine", "description"} <= set(result)
    assert result["bounds"]["matmul"]["fp32"]["peak_flops_per_s"] > 0 and result["bounds"]["bandwidth"]["bytes_per_s"] > 0
    # the sweep holds a decoding step's shapes too: one token for each of the 2 rows, through the layers and the head
    assert {(r["m"], r["gemm"]) for r in result["bounds"]["matmul"]["fp32"]["shapes"] if r["m"] == 2} >= {(2, "head")}
    [cell] = result["cells"]
    assert (cell["precision"], cell["batch"], cell["completion"], cell["rollout"]) == ("fp32", 2, 4, "hf")
    cases = {c["case"]: c for c in cell["cases"]}
    assert list(cases) == ["sd", "unisd-star", "sft"]
    wanted = {"sd": {"sampling", "student", "teacher", "backward", "optimizer"},
              "unisd-star": {"sampling", "student", "teacher", "agree", "contrast", "backward", "optimizer"},
              "sft": {"student", "backward", "optimizer"}}
    for name, case in cases.items():
        assert set(case["phases"]) == wanted[name], name
        assert all(p["fraction"] > 0 and p["seconds"] > 0 for p in case["phases"].values()), name
    star = cases["unisd-star"]["probes"]
    # logits only at the 2 x 4 completion positions, for the student, the teacher and each of agree's 3 contexts
    assert star["head_positions"]["student"] == star["head_positions"]["teacher"] == 8
    assert star["head_positions"]["agree"] == 3 * 8
    assert len(star["rows"]["student"]) == 2 and all(w == star["rows"]["student"][0][1] for _, w in star["rows"]["student"])
    assert "| fp32 | 2 | 4 | hf | unisd-star |" in result["table"] and "backward at its kernels" in result["table"]
    assert all(c["phases"]["backward"]["kernel_fraction"] > 0 for c in cases.values())
    sampling = cases["sd"]["phases"]["sampling"]
    assert sampling["kernel_fraction"] > 0 and "sampling at its kernels" in result["table"]
    assert sampling["fraction"] == pytest.approx((sampling["prefill_s"] + sampling["decode_s"]) / sampling["seconds"])
    assert sampling["bandwidth_fraction"] == pytest.approx(sampling["bytes"] / sampling["seconds"]
                                                          / result["bounds"]["bandwidth"]["bytes_per_s"])
    # the fractions come again from the stored measurements alone: the docs derive them with the code as it is
    assert roofline.derive(result)["table"] == result["table"]
    slow_memory = {**result, "bounds": {**result["bounds"], "bandwidth": {**result["bounds"]["bandwidth"], "bytes_per_s": 1.0}}}
    assert roofline.derive(slow_memory)["cells"][0]["cases"][0]["phases"]["sampling"]["fraction"] > sampling["fraction"]
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    assert spec and spec.loader
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert result["table"] in generate.roofline(out) and result["bounds_line"] in generate.roofline(out)
    assert result["ratio_table"] in generate.roofline(out) and "| fp32 | 2 | 4 | hf |" in result["ratio_table"]
    assert result["kernel_table"] and result["kernel_table"] in generate.roofline(out)
    assert set(result["ratios"][0]) == {"precision", "batch", "completion", "rollout", "time", "flops", "floor"}
    assert "Not measured yet" in generate.roofline(tmp_path / "absent.json")


def _measured(name: str, step: float, flops: float, seconds: float) -> dict:
    return {"case": name, "metrics": {"step_time_s": step},
            "phases": {"sampling": {"bytes": 1.0, "seconds": 5.0}, "student": {"flops": flops, "seconds": seconds}}}


@pytest.mark.parametrize("star_step, star_flops, verdict", [(16.0, 600.0, "forbidden by the FLOPs"),
                                                           (12.0, 300.0, "met"), (15.0, 300.0, "not met")])
def test_unisd_over_sd_by_hand(star_step, star_flops, verdict):
    """SD: a 10 s step of 100 matrix FLOPs; at a peak of 100 FLOP/s UniSD*'s extra FLOPs add 1 s per 100."""
    cell = {"precision": "fp32", "batch": 4, "completion": 64, "rollout": "hf",
            "cases": [_measured("sd", 10.0, 100.0, 4.0), _measured("unisd-star", star_step, star_flops, 9.0)]}
    found = roofline.ratio(cell, 100.0)
    assert found == pytest.approx({"time": star_step / 10, "flops": star_flops / 100,
                                   "floor": (10 + (star_flops - 100) / 100) / 10})
    bounds = {"matmul": {"fp32": {"peak_flops_per_s": 100.0}}}
    assert roofline.ratio_table([cell], bounds).splitlines()[-1].endswith(f"| {verdict} |")
    assert roofline.ratio({**cell, "cases": cell["cases"][:1]}, 100.0) is None
    assert roofline.ratio_table([{**cell, "cases": cell["cases"][:1]}], bounds) == ""


def test_each_case_closes_its_runs_engine_even_when_its_step_fails(monkeypatch, tmp_path):
    """A grid prepares a run per case; a vLLM engine left open keeps its memory, and a whole grid held eight."""
    import torch

    from unisd import train

    closed: list[str] = []

    class Policy:
        model = torch.nn.Linear(2, 2)

        def close(self) -> None:
            closed.append("engine")

    class Run:
        policy = Policy()

    monkeypatch.setattr(roofline.bench_step, "prepared", lambda *a, **k: Run())
    monkeypatch.setattr(train, "step", lambda run: {"step_time_s": 1.0})
    found = roofline.measure_case("sd", tmp_path / "d.jsonl", tmp_path, "m", 2, 4, "fp32", "vllm")
    assert closed == ["engine"] and found["metrics"]["step_time_s"] == 1.0 and found["trained_parameters"] == 6

    def fails(run):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train, "step", fails)
    with pytest.raises(RuntimeError):
        roofline.measure_case("sd", tmp_path / "d.jsonl", tmp_path, "m", 2, 4, "fp32", "vllm")
    assert closed == ["engine", "engine"]
