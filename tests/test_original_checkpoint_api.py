"""`vit_jax.checkpoint` as scripts and tests written for the original call it.

The original's `inspect_params` adds back the empty sub-trees a saved file cannot hold (a
parameter-free module) and words its errors "Missing params from checkpoint" / "Extra params in
checkpoint"; its renumbering of the older module names is `convert_pre_linen_pytree`.
"""

import flax
import jax
import numpy as np
import pytest

from vit_jax import checkpoint


@pytest.mark.parametrize(
    "empty",
    [
        {"empty": {}},
        {"block": {"empty": {}}},
        {"block": {"layer": {"empty": {}}}},
        {"block": {"first": {}, "second": {}}},
    ],
    ids=["top_level", "nested", "deep", "siblings"],
)
def test_inspect_params_adds_back_the_empty_subtrees_of_expected(empty):
    kernel = np.array([1.0, 2.0])
    expected = {"block": {"kernel": kernel}}
    for key, value in empty.items():
        if key == "block":
            expected["block"].update(value)
        else:
            expected[key] = value
    result = checkpoint.inspect_params(params={"block": {"kernel": kernel}}, expected=expected)
    assert jax.tree.structure(result) == jax.tree.structure(expected)
    assert result["block"]["kernel"] is kernel  # the loaded arrays, not copies
    restored = flax.serialization.from_state_dict(expected, result)  # a usable state dict
    assert jax.tree.structure(restored) == jax.tree.structure(expected)


def test_inspect_params_uses_the_original_words_for_missing_and_extra():
    with pytest.raises(ValueError, match="Missing params from checkpoint"):
        checkpoint.inspect_params(params={}, expected={"block": {"kernel": np.ones(2)}})
    with pytest.raises(ValueError, match="Extra params in checkpoint"):
        checkpoint.inspect_params(params={"unexpected": np.ones(2)}, expected={"block": {}})


def test_permissive_inspection_keeps_what_is_there_and_adds_only_empty_subtrees():
    kernel = np.ones(2)
    result = checkpoint.inspect_params(
        params={"block": {"kernel": kernel}},
        expected={"block": {"empty": {}}, "missing": np.zeros(2)},
        fail_if_extra=False,
        fail_if_missing=False,
    )
    assert set(result) == {"block"} and set(result["block"]) == {"kernel", "empty"}
    assert result["block"]["kernel"] is kernel


def test_convert_pre_linen_pytree_renumbers_per_module_type():
    tree = {
        "mod_0": {"submod1_0": {}, "submod2_1": {}, "submod1_2": {}},
        "mod2_2": {"mod2_2_0": {}},
        "mod2_11": {"mod2_11_0": {}},
        "mod2_1": {"mod2_1_0": {}},
    }
    assert checkpoint.convert_pre_linen_pytree(tree) == {
        "mod_0": {"submod1_0": {}, "submod1_1": {}, "submod2_0": {}},
        "mod2_0": {"mod2_1_0": {}},
        "mod2_1": {"mod2_2_0": {}},
        "mod2_2": {"mod2_11_0": {}},
    }
