"""The README's main-job command (`python -m vit_jax.demo`) runs and reports what it checks."""

import os

from vit_jax import demo


def test_demo_round_trips_and_resamples(tmp_path, capsys):
    # Two of the zoo's rows: test_models.py checks every model's count.
    figures = demo.run(str(tmp_path), names=["ViT-B_16", "Mixer-B_16"])
    out = capsys.readouterr().out
    assert figures == {"identical": 1.0, "posemb_rows": 17.0}
    assert "ViT-B_16" in out and "86,567,656" in out
    assert "Mixer-B_16" in out and "59,880,472" in out
    assert "read back bit-identical: True" in out
    assert os.path.exists(tmp_path / "testing_21.npz")
