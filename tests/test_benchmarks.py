"""Tests for vit_jax/inference_time.py and benchmarks/benchmark.py: they measure what they say.

Speed itself is not asserted here (that is what the benchmark prints); these tests check the
step counts, the memory/FLOP figures and the ratios' arithmetic on the tiny 'testing' model.
"""

import jax
import pytest

from benchmarks import benchmark
from vit_jax import inference_time


def test_inference_time_runs_the_requested_number_of_steps(monkeypatch):
    calls = []
    real = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: calls.append(1) or real(x))
    ips = inference_time.images_per_second("testing", 16, batch=2, steps=4)
    assert len(calls) == 1 + 4  # one warm-up call, then every requested step
    assert ips > 0


def test_inference_time_rejects_non_positive_steps():
    with pytest.raises(ValueError, match="steps=0"):
        inference_time.images_per_second("testing", 16, batch=2, steps=0)


def test_benchmark_row_reports_memory_and_flops():
    row = benchmark.measure("testing", 16, "reference", batch=8, repeats=1, compile_only=True)
    assert row.peak_mib > 0 and row.compile_s > 0 and row.train_ips is None
    assert row.gflop_per_img > 0


def test_swin_and_beit_rows_run_the_variants_they_have_and_timms_model():
    """Swin and BEiT take the compute dtype only; their timm row is timm's own model, and its
    FLOPs are the same order as ours (XLA's count of our train step vs timm's forward × 3)."""
    variants = ["reference", "scan", "bf16", "chunks2"]
    assert benchmark.model_variants("testing-beit", variants) == (
        ["reference", "bf16"],
        ["scan", "chunks2"],
    )
    rows = benchmark.measure_model("testing-swin", 16, variants, 8, repeats=1, with_timm=True)
    assert [r.variant for r in rows] == ["reference", "bf16", "timm (torch fp32)"]
    assert all(r.train_ips > 0 and r.infer_ips > 0 for r in rows)
    assert rows[0].gflop_per_img > 0


def test_every_variant_gets_the_reference_model_flops():
    # XLA counts a scanned loop body once, so the scan row's own count is a fraction.
    rows = [
        benchmark.Row("m@224", "reference", gflop_per_img=7.6),
        benchmark.Row("m@224", "scan", gflop_per_img=0.7),
        benchmark.Row("n@224", "scan", gflop_per_img=0.7),  # no reference measured
    ]
    benchmark.use_model_flops(rows)
    assert [r.gflop_per_img for r in rows] == [7.6, 7.6, None]


def test_benchmark_table_prints_ratios_against_the_reference(capsys):
    rows = [
        benchmark.Row("m@224", "reference", train_ips=10.0, peak_mib=100.0),
        benchmark.Row("m@224", "fast", train_ips=15.0, peak_mib=40.0),
    ]
    benchmark.print_table(rows)
    out = capsys.readouterr().out
    assert "15.0 (1.50×)" in out and "40 (0.40×)" in out


def test_variants_are_timed_in_turns():
    order = []
    seconds = benchmark.round_robin_seconds(
        [lambda: order.append("a"), lambda: order.append("b")], repeats=3, warmup=1
    )
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then alternate
    assert [len(s) for s in seconds] == [3, 3] and all(t >= 0 for s in seconds for t in s)


def test_paired_ratios_compare_round_by_round():
    # A slow spell that stretches both calls of round 2 leaves that round's speed-up at 2×.
    reference = [2.0, 6.0, 2.0, 2.0, 2.0]
    fast = [1.0, 3.0, 1.0, 1.0, 1.0]
    assert benchmark.paired_ratios(reference, fast) == (2.0, 2.0, 2.0)
    median, q1, q3 = benchmark.paired_ratios([1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 2.0, 1.0, 0.8])
    assert (median, q1, q3) == (1.0, 1.0, 1.25)
    assert benchmark.paired_ratios([3.0], [2.0]) == (1.5, 1.5, 1.5)


def test_table_shows_the_paired_ratio_and_its_quartiles(capsys):
    rows = [
        benchmark.Row("m@224", "reference", train_ips=10.0, train_vs_ref=(1.0, 1.0, 1.0)),
        benchmark.Row("m@224", "fast", train_ips=12.0, train_vs_ref=(1.13, 1.08, 1.19)),
    ]
    benchmark.print_table(rows)
    out = capsys.readouterr().out
    assert "12.0 (1.13×)" in out and "1.08–1.19" in out  # the paired median, not 12 / 10


def test_chunks2_variant_keeps_the_reference_parameter_tree():
    def shapes(variant):
        model = benchmark.build_model("testing", variant)
        tree = jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 16, 16, 3)), train=False)
        )
        return jax.tree.map(lambda leaf: leaf.shape, tree)

    assert benchmark.VARIANTS["chunks2"] == {"batch_chunks": 2}
    assert shapes("chunks2") == shapes("reference")


def test_attention_agreement_compares_real_features():
    # On a GPU the benchmark compares cuDNN with XLA; the same code compares Flax with XLA here.
    diff, scale = benchmark.attention_agreement("testing", 16, 2, "flax", jax.numpy.float32)
    assert scale > 0.1 and diff <= 1e-5 * scale
    bf16_diff, _ = benchmark.attention_agreement("testing", 16, 2, "flax", jax.numpy.bfloat16)
    assert bf16_diff > diff  # the check sees rounding: it would see a wrong kernel


def test_gpu_only_variants_run_on_gpus_only():
    variants = ["reference", "bf16_cudnn", "bf16_dots"]
    assert benchmark.runnable_variants(variants, "cpu") == (
        ["reference", "bf16_dots"],
        ["bf16_cudnn"],
    )
    assert benchmark.runnable_variants(variants, "tpu")[1] == ["bf16_cudnn"]
    assert benchmark.runnable_variants(variants, "gpu") == (variants, [])


def test_loss_curves_reads_the_train_loss_lines_of_train_log():
    from benchmarks import loss_curves

    log = (
        "2026-11-21 09:21:10,684 INFO absl logging_writer.py:48] [1000] train/grad_norm=2.05, "
        "train/img_per_sec_per_core=2747.55, train/loss=1.54134, train/lr=0.00231\n"
        "2026-11-21 09:21:11,000 INFO absl logging_writer.py:48] [1000] eval/loss=9.5\n"
        "2026-11-21 09:21:48,535 INFO absl logging_writer.py:48] [2000] train/loss=1.2e-05\n"
    )
    assert loss_curves.loss_curve(log) == {1000: 1.54134, 2000: 1.2e-05}
