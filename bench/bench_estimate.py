"""How accurate is autoscale.estimate? Estimated against measured peak, plan by plan.

    python bench/bench_estimate.py            # every model, every plan (~3 min here)
    python bench/bench_estimate.py --quick    # two models: a smoke test

For each model (the examples: mlp, cnn, the char GPT, HuggingFace GPT-2; and HuggingFace
Llama, BERT and ViT style models built from configs, no weights) and a spread of plans
(default, every block checkpointed, half of them, bf16, fp16, micro-batches of a quarter,
8-bit AdamW, SGD with momentum, LAMB), it prints the estimated peak, the peak measured on
this machine by the CPU allocator (torch.profiler's memory events, what the tuner measures)
and the error, then per model and overall the median and largest absolute error. Beside
it, the baseline: what autoscale estimated before (a sum over the captured graph's tensors,
``estimate_graph`` uncalibrated), on the same plans. Goals (issue 15): every error within
5%, the median within 2%.

Step-time estimates are not built yet; this prints peaks only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def _hf(name: str) -> tuple[torch.nn.Module, Any]:
    import transformers as tf

    torch.manual_seed(0)
    ids = torch.randint(0, 512, (8, 64))
    common = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=512, use_cache=False)
    if name == "llama":
        config = tf.LlamaConfig(vocab_size=512, num_key_value_heads=2, **common)
        return tf.LlamaForCausalLM(config), {"input_ids": ids, "labels": ids}
    if name == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(vocab_size=512, **common)), {
            "input_ids": ids, "labels": ids}
    config = tf.ViTConfig(image_size=64, patch_size=8, num_labels=10, **common)
    return tf.ViTForImageClassification(config), {
        "pixel_values": torch.randn(8, 3, 64, 64), "labels": torch.randint(0, 10, (8,))}


def models(quick: bool) -> dict[str, Any]:
    import cnn
    import gpt
    import hf_gpt2
    import mlp

    out = {"mlp": lambda: mlp.build(batch_size=64), "gpt": lambda: gpt.build()}
    if quick:
        return out
    out.update({"cnn": lambda: cnn.build(batch_size=32),
                "hf-gpt2": lambda: hf_gpt2.build(batch_size=8),
                "hf-llama": lambda: _hf("llama"), "hf-bert": lambda: _hf("bert"),
                "hf-vit": lambda: _hf("vit")})
    return out


def plans(graph: Any, batch: int) -> dict[str, Any]:
    from autoscale import BatchPlan, CheckpointPlan, Plan, PrecisionPlan
    from autoscale.runtime._optimizers import optimizer_plan

    blocks = tuple(b.fqn for b in graph.blocks)
    micro = max(batch // 4, 1)
    out = {"default": Plan(),
           "bf16": Plan(sections={"precision": PrecisionPlan(mode="bf16")}),
           "fp16": Plan(sections={"precision": PrecisionPlan(mode="fp16")}),
           f"micro {micro}x{batch // micro}": Plan(sections={"batch": BatchPlan(
               micro_batch_size=micro, grad_accum_steps=batch // micro)}),
           "8-bit AdamW": Plan(sections={"optimizer": optimizer_plan("adamw8bit", None)}),
           "SGD momentum": Plan(sections={"optimizer": optimizer_plan(
               "sgd", {"lr": 0.1, "momentum": 0.9})}),
           "LAMB": Plan(sections={"optimizer": optimizer_plan("lamb", None)})}
    if blocks:
        out["ckpt all"] = Plan(sections={"checkpoint": CheckpointPlan(blocks=blocks)})
        out["ckpt half + bf16"] = Plan(sections={
            "checkpoint": CheckpointPlan(blocks=blocks[: len(blocks) // 2]),
            "precision": PrecisionPlan(mode="bf16")})
    return out


def measured_peak(plan: Any, model: torch.nn.Module, batch: Any, graph: Any,
                  loss_fn: Any) -> int:
    from autoscale.measure import measure
    from autoscale.runtime import build_result

    result = build_result(plan, model, graph=graph, loss_fn=loss_fn)
    return measure(result, batch, warmup=1, iters=1).peak_memory_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two models only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from bench_large_batch import cpu_name

    import autoscale
    from autoscale._units import format_bytes
    from autoscale.cost._cost import estimate_graph
    from autoscale.runtime._batch import batch_size

    print(f"machine: {cpu_name()}, torch {torch.__version__}")
    header = (f"{'model':9s} {'plan':17s} {'measured':>11s} {'estimate':>11s} {'error':>7s} "
              f"{'graph est.':>11s} {'error':>7s} {'est. s':>6s}")
    print(header)
    print("-" * len(header))
    errors: dict[str, list[float]] = {}
    baseline_errors: list[float] = []
    for name, build in models(args.quick).items():
        model, batch, *rest = build()
        loss_fn = rest[0] if rest else None
        graph = autoscale.capture(model, batch)
        for label, plan in plans(graph, batch_size(batch)).items():
            got = measured_peak(plan, model, batch, graph, loss_fn)
            start = time.perf_counter()
            est = autoscale.estimate(model, batch, plan, graph=graph, loss_fn=loss_fn).total
            took = time.perf_counter() - start
            old = estimate_graph(model, graph, plan).total
            err, old_err = est / got - 1, old / got - 1
            errors.setdefault(name, []).append(abs(err))
            baseline_errors.append(abs(old_err))
            print(f"{name:9s} {label:17s} {format_bytes(got):>11s} {format_bytes(est):>11s} "
                  f"{err:+7.2%} {format_bytes(old):>11s} {old_err:+7.2%} {took:6.2f}")
    print()
    print(f"{'model':9s} {'plans':>5s} {'median |err|':>13s} {'max |err|':>10s}")
    for name, errs in errors.items():
        print(f"{name:9s} {len(errs):5d} {statistics.median(errs):13.2%} {max(errs):10.2%}")
    every = [e for errs in errors.values() for e in errs]
    print(f"{'all':9s} {len(every):5d} {statistics.median(every):13.2%} {max(every):10.2%}")
    print(f"{'graph est':9s} {len(baseline_errors):5d} "
          f"{statistics.median(baseline_errors):13.2%} {max(baseline_errors):10.2%}"
          "   (the previous estimate, same plans)")
    ok = max(every) <= 0.05 and statistics.median(every) <= 0.02
    print(f"goal (every error within 5%, median within 2%): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
