"""The Vision Transformer (Flax linen), parameter-compatible with the released checkpoints.

This module owns the ViT forward pass and its speed/memory options. It does not own the model
sizes (see `vit_jax.models`), the checkpoint format (see `vit_jax.checkpoint`) or the rounded
matmuls of `matmul_dtype` (see `vit_jax.matmul_precision`).

The parameter tree is the original's, name for name and shape for shape. The options the
original lacks (`dtype`, `matmul_dtype`, `attention_impl`, `remat_policy`, `scan`,
`batch_chunks`, `drop_path_rate`) never change the parameter tree, except that `scan=True`
stacks the encoder blocks under one `encoderblock` entry (`vit_jax.checkpoint.scan_params` /
`unscan_params` convert between the layouts). The head options (`head_hidden_size`, the
`features` argument; `vit_jax.model_heads`) add or widen head parameters only when used.
`activation` (the MLP blocks' GELU) never changes the tree; `distilled=True` (DeiT's
distillation token, `vit_jax.model_heads`) adds `dist_token`, `head_dist` and one position row,
and then returns a (class, distillation) logits pair in training.

Named intermediates: apply with `mutable=['intermediates']` to get the encoder's per-token
output (`encoded`), the pooled `pre_logits` (at `pre_logits/__call__`) and, with
`attention_impl='flax'`, every block's attention weights
(`.../MultiHeadDotProductAttention_0/attention_weights`), and, in training with
`drop_path_rate` > 0, every block's drop-path keep masks (`.../drop_path_keep`), without new
flags.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import model_heads, models_resnet, stochastic_depth
from vit_jax.matmul_precision import rounded_dot_general
from vit_jax.vit_options import (  # noqa: F401 (re-exported: the options and their checks)
    ACTIVATIONS,
    ATTENTION_IMPLS,
    CLASSIFIERS,
    INPUT_NORMS,
    LAYERNORM_EPSILON,
    REMAT_POLICIES,
    TRANSFORMER_DEFAULTS,
    _field,
    check_image_size,
    check_num_classes,
    normalize_input,
    stem_stride,
    transformer_option,
    validate_options,
)


def fused_attention_fn(implementation: str | None) -> Callable[..., jax.Array]:
    """An `attention_fn` for Flax's attention module that calls `jax.nn.dot_product_attention`.

    The query/key/value projections (and so the parameters) stay Flax's; only the
    softmax(q·kᵀ/√d)·v core is swapped. Attention-weight dropout is not supported by the fused
    kernels, so a training call with a non-zero attention dropout rate is refused.
    """

    def attention_fn(query, key, value, dropout_rate=0.0, deterministic=True):
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError(
                f"attention_impl={implementation or 'auto'!r} cannot apply attention dropout "
                f"(attention_dropout_rate={dropout_rate}); train with attention_impl='flax' or "
                "set transformer.attention_dropout_rate=0."
            )
        return jax.nn.dot_product_attention(query, key, value, implementation=implementation)

    return attention_fn


class IdentityLayer(nn.Module):
    """Names a point in the model (`pre_logits`) without adding parameters.

    Sows its output as intermediates `<name>/__call__` (the layout of Flax's
    `capture_intermediates`): a `sow` named like a child module in the parent would collide.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        self.sow("intermediates", "__call__", x)
        return x


class TanhDense(nn.Dense):
    """Dense + tanh (`pre_logits` with a representation layer); params as a plain Dense.

    Sows its output as intermediates `<name>/__call__`, like `IdentityLayer`.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        x = nn.tanh(super().__call__(inputs))
        self.sow("intermediates", "__call__", x)
        return x


class AddPositionEmbs(nn.Module):
    """Adds a learned position table of shape (1, tokens, hidden) to the inputs."""

    posemb_init: Callable[..., jax.Array] = nn.initializers.normal(stddev=0.02)
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if inputs.ndim != 3:
            raise ValueError(f"Position table needs (batch, tokens, hidden), got {inputs.shape}")
        shape = (1, inputs.shape[1], inputs.shape[2])
        pos_embedding = self.param("pos_embedding", self.posemb_init, shape, self.param_dtype)
        return inputs + pos_embedding.astype(inputs.dtype)


class MlpBlock(nn.Module):
    """Dense → GELU (`activation`, default the tanh approximation) → Dropout → Dense → Dropout."""

    mlp_dim: int
    dtype: Any = jnp.float32
    out_dim: int | None = None
    dropout_rate: float = 0.1
    kernel_init: Callable[..., jax.Array] = nn.initializers.xavier_uniform()
    bias_init: Callable[..., jax.Array] = nn.initializers.normal(stddev=1e-6)
    dot_general: Callable[..., jax.Array] | None = None  # None: jax.lax.dot_general
    activation: str = "gelu_tanh"  # a key of ACTIVATIONS

    @nn.compact
    def __call__(self, inputs: jax.Array, *, deterministic: bool) -> jax.Array:
        out_dim = inputs.shape[-1] if self.out_dim is None else self.out_dim
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dot_general=self.dot_general,
        )
        x = dense(features=self.mlp_dim)(inputs)
        x = ACTIVATIONS[self.activation](x)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        x = dense(features=out_dim)(x)
        return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + Dropout(MHA(LN(x))), then x + MLP(LN(x)).

    `deterministic` is positional so that `nn.remat` can treat it as static. With
    `scanned=True` the block returns `(x, None)`, the carry/output pair `nn.scan` needs.
    `drop_path`, this layer's (rate, key) from `stochastic_depth.layer_drops`, drops each
    residual branch per sample (training only; the encoder passes None otherwise); the keep
    masks are sown as intermediates `drop_path_keep`, shape (2, batch): attention, MLP.
    """

    mlp_dim: int
    num_heads: int
    dtype: Any = jnp.float32
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    attention_impl: str = "flax"
    matmul_dtype: Any = None
    scanned: bool = False
    activation: str = "gelu_tanh"

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        deterministic: bool,
        drop_path: stochastic_depth.LayerDrops | None = None,
    ):
        dot_general = None
        if self.matmul_dtype is not None:
            dot_general = rounded_dot_general(self.matmul_dtype)
        if self.attention_impl == "flax":
            attention_fn = functools.partial(
                nn.dot_product_attention, einsum_dot_general=dot_general
            )
        else:
            attention_fn = fused_attention_fn(
                None if self.attention_impl == "auto" else self.attention_impl
            )
        x = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype)(inputs)
        x = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            broadcast_dropout=False,
            deterministic=deterministic,
            dropout_rate=self.attention_dropout_rate,
            attention_fn=attention_fn,
            qkv_dot_general=dot_general,
            out_dot_general=dot_general,
        )(
            x,
            x,
            sow_weights=self.attention_impl == "flax"
            and self.is_mutable_collection("intermediates"),
        )
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        if drop_path is not None:
            rate, key = drop_path
            attention_key, mlp_key = jax.random.split(key)
            x, keep_attention = stochastic_depth.drop_path(x, rate, attention_key)
        x = x + inputs

        y = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype)(x)
        y = MlpBlock(
            mlp_dim=self.mlp_dim,
            dtype=self.dtype,
            dropout_rate=self.dropout_rate,
            dot_general=dot_general,
            activation=self.activation,
        )(y, deterministic=deterministic)
        if drop_path is not None:
            y, keep_mlp = stochastic_depth.drop_path(y, rate, mlp_key)
            self.sow("intermediates", "drop_path_keep", jnp.stack([keep_attention, keep_mlp]))
        out = x + y
        return (out, None) if self.scanned else out


class Encoder(nn.Module):
    """Position embedding, `num_layers` blocks and the final LayerNorm (`encoder_norm`).

    Blocks are `encoderblock_{i}`; with `scan=True` one `encoderblock` whose parameters carry
    a leading axis of length `num_layers` (compiles once, whatever the depth).

    With `batch_chunks` > 1 the whole encoder runs once per equal slice of the batch (same
    parameters, results concatenated): see `VisionTransformer.batch_chunks`.

    With `drop_path_rate` > 0 and `train`, each pass (each slice) takes one 'dropout' key and
    splits it into one key per layer, passed to the blocks with their rates (a scanned input
    under `scan`), so the scanned and unrolled encoders drop the same samples.
    """

    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    add_position_embedding: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "flax"
    remat_policy: str | None = None
    scan: bool = False
    batch_chunks: int = 1
    matmul_dtype: Any = None
    drop_path_rate: float = 0.0
    activation: str = "gelu_tanh"

    def __call__(self, x: jax.Array, *, train: bool, keep: jax.Array | None = None) -> jax.Array:
        chunks = math.gcd(self.batch_chunks, x.shape[0])
        if chunks == 1 or self.is_mutable_collection("intermediates"):
            return self.encode(x, train=train, keep=keep)  # intermediates: whole-batch layout
        keeps = [None] * chunks if keep is None else jnp.split(keep, chunks)
        slices = zip(jnp.split(x, chunks), keeps, strict=True)
        return jnp.concatenate([self.encode(c, train=train, keep=k) for c, k in slices])

    @nn.compact
    def encode(self, x: jax.Array, *, train: bool, keep: jax.Array | None = None) -> jax.Array:
        """The encoder on (a slice of) the batch; every call shares the same parameters.

        `keep` [batch, K]: the token indices (class token included) the blocks see, gathered
        after the position embedding, so each kept token keeps its own position (MAE).
        """
        if self.add_position_embedding:
            x = AddPositionEmbs(name="posembed_input")(x)
            x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
        if keep is not None:
            x = jnp.take_along_axis(x, keep[..., None], axis=1)

        block_cls = Encoder1DBlock
        if self.remat_policy is not None:
            policy = getattr(jax.checkpoint_policies, self.remat_policy)
            block_cls = nn.remat(
                block_cls, policy=policy, prevent_cse=not self.scan, static_argnums=(2,)
            )
        block_kwargs = dict(
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dtype=self.dtype,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            attention_impl=self.attention_impl,
            matmul_dtype=self.matmul_dtype,
            activation=self.activation,
        )
        drops = None
        if train and self.drop_path_rate > 0:
            key = self.make_rng("dropout")
            drops = stochastic_depth.layer_drops(key, self.drop_path_rate, self.num_layers)
        # The per-layer (rate, key) pairs, when present, are the blocks' third argument.
        extra = () if drops is None else (drops,)
        if self.scan:
            scanned_cls = nn.scan(
                block_cls,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast if drops is None else (nn.broadcast, 0),
                length=self.num_layers,
            )
            block = scanned_cls(name="encoderblock", scanned=True, **block_kwargs)
            x, _ = block(x, not train, *extra)
        else:
            for layer in range(self.num_layers):
                layer_extra = jax.tree_util.tree_map(lambda a, i=layer: a[i], extra)
                block = block_cls(name=f"encoderblock_{layer}", **block_kwargs)
                x = block(x, not train, *layer_extra)
        return nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name="encoder_norm")(x)


class VisionTransformer(nn.Module):
    """Vision Transformer with the original's constructor (so zoo configs and scripts port).

    Attributes:
      num_classes: head size; 0 or None means no head (the model returns features).
      patches: config with `size` (patch height, width).
      transformer: config with `num_layers`, `mlp_dim`, `num_heads`, `dropout_rate`,
        `attention_dropout_rate`.
      hidden_size: token width D.
      resnet: None, or config with `num_layers` (units per stage) and `width_factor` (hybrid).
      representation_size: if set, `pre_logits` is Dense(representation_size) + tanh.
      classifier: 'token' (class token), 'gap' (mean over tokens), 'unpooled' (all tokens, no
        class token), 'token_unpooled' (all tokens including the class token).
      head_bias_init: the head's bias init (-10 for sigmoid-loss pretraining).
      dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, logits are float32.
      attention_impl: 'flax' (the original) or 'auto' / 'xla' / 'cudnn' for
        `jax.nn.dot_product_attention`. Same parameters, same fp32 outputs.
      remat_policy: None, or a `jax.checkpoint_policies` name from REMAT_POLICIES, applied to
        every encoder block (saves activation memory at the cost of recomputation).
      scan: run the encoder blocks with `nn.scan` (stacked parameters, faster compile).
      batch_chunks: an int >= 1 (anything else is a ValueError): run the encoder once per
        equal slice of the batch, this many slices (gcd with the batch size; 1 = whole batch,
        the default). It exists for speed on XLA:CPU, where two half-batches ran the B/16 train
        step and Ti/16 inference faster than one whole batch (benchmarks/RESULTS.md has the
        figures and commands), presumably as the smaller slices' activations stay in cache.
        Outputs and gradients are the
        whole-batch pass's up to fp32 rounding (summation order); dropout masks differ from a
        whole-batch pass. Not applied when intermediates are collected.
      matmul_dtype: None (the matmuls run in `dtype`) or a float dtype such as jnp.bfloat16:
        every matmul of the encoder blocks (q/k/v/out projections, MLP and, with
        attention_impl='flax', q·kᵀ and weights·v), forward and backward, rounds its operands
        to it and accumulates in float32 (`rounded_dot_general`), while activations, LayerNorm,
        softmax and GELU stay in `dtype`. With dtype float32 this is bf16 mixed precision for
        CPUs that multiply bf16 fast (AVX512-BF16, AMX) but run bf16 elementwise code slowly:
        on such a CPU the projections, MLP and their input gradients become bf16 multiplies.
      drop_path_rate: stochastic depth (`vit_jax.stochastic_depth`), a float in [0, 1): in
        training, block i of L drops each residual branch per sample with rate
        drop_path_rate·i/(L-1), using the 'dropout' rng. 0 (the default) is off.
      head_hidden_size: 0 / None (the default): the single Dense `head`; an int: Dense
        `head_hidden` of that width and exact GELU before the head (`vit_jax.model_heads`).
      activation: the MLP blocks' GELU, a key of ACTIVATIONS: 'gelu_tanh' (the original's
        tanh approximation, the default) or 'gelu' (exact erf, for weights trained in PyTorch).
      distilled: DeiT's distillation token (classifier='token' only): a `dist_token` after the
        class token, a position table with two leading special rows, and a second head
        `head_dist` on that token. In training the model returns the pair (class-token logits,
        distillation-token logits); in evaluation their mean (`vit_jax.model_heads`).
      input_norm: the pixel normalisation the weights were trained with, a key of INPUT_NORMS:
        'inception' (the original's [-1, 1], what the pipelines give; the default) or
        'imagenet' (ImageNet mean/std: DeiT, MAE), mapped from [-1, 1] inside the model.

    `__call__(inputs, *, train, features=None, patch_fn=None, keep=None)`: `features`,
    [batch, F], are concatenated to the pooled `pre_logits` output before the head (pooled
    classifiers only). The self-supervised objectives (`vit_jax.models_ssl`) use the other two:
    `patch_fn` maps the patch embeddings [batch, N, D] before the class token is added
    (masked patch prediction corrupts them), `keep` [batch, K] selects the tokens the encoder
    blocks see (MAE's visible patches, indices into the class token + patch sequence).
    """

    num_classes: int | None
    patches: Any
    transformer: Any
    hidden_size: int
    resnet: Any | None = None
    representation_size: int | None = None
    classifier: str = "token"
    head_bias_init: float = 0.0
    encoder: type[nn.Module] = Encoder
    model_name: str | None = None
    dtype: Any = jnp.float32
    attention_impl: str = "flax"
    remat_policy: str | None = None
    scan: bool = False
    batch_chunks: int = 1
    matmul_dtype: Any = None
    drop_path_rate: float = 0.0
    head_hidden_size: int | None = None
    activation: str = "gelu_tanh"
    distilled: bool = False
    input_norm: str = "inception"

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(_field(self.patches, "size"))

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        *,
        train: bool,
        features: jax.Array | None = None,
        patch_fn: Callable[[jax.Array], jax.Array] | None = None,
        keep: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        validate_options(
            classifier=self.classifier,
            attention_impl=self.attention_impl,
            remat_policy=self.remat_policy,
            batch_chunks=self.batch_chunks,
            matmul_dtype=self.matmul_dtype,
            drop_path_rate=self.drop_path_rate,
            activation=self.activation,
            distilled=self.distilled,
            input_norm=self.input_norm,
        )
        check_num_classes(self.num_classes)
        model_heads.check_head_hidden_size(self.head_hidden_size)
        model_heads.check_features(features, inputs.shape, self.classifier)
        check_image_size(
            inputs.shape[1:3], self.patch_size, stem_stride(self.resnet), self.model_name
        )
        x = normalize_input(inputs, self.input_norm).astype(self.dtype)

        if self.resnet is not None:
            # Built inline so its parameters sit at the top level, as in the released files.
            x = models_resnet.resnet_stem(
                x,
                num_layers=tuple(_field(self.resnet, "num_layers")),
                width_factor=_field(self.resnet, "width_factor"),
                dtype=self.dtype,
            )

        x = nn.Conv(
            features=self.hidden_size,
            kernel_size=self.patch_size,
            strides=self.patch_size,
            padding="VALID",
            dtype=self.dtype,
            name="embedding",
        )(x)
        n, h, w, c = x.shape
        x = jnp.reshape(x, (n, h * w, c))
        if patch_fn is not None:
            x = patch_fn(x)

        if self.classifier in ("token", "token_unpooled"):
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
            x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)
        if self.distilled:
            x = model_heads.insert_dist_token(self, x)

        x = self.encoder(
            name="Transformer",
            num_layers=_field(self.transformer, "num_layers"),
            mlp_dim=_field(self.transformer, "mlp_dim"),
            num_heads=_field(self.transformer, "num_heads"),
            dropout_rate=transformer_option(self.transformer, "dropout_rate"),
            attention_dropout_rate=transformer_option(self.transformer, "attention_dropout_rate"),
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            remat_policy=self.remat_policy,
            scan=self.scan,
            batch_chunks=self.batch_chunks,
            matmul_dtype=self.matmul_dtype,
            drop_path_rate=self.drop_path_rate,
            activation=self.activation,
        )(x, train=train, keep=keep)
        self.sow("intermediates", "encoded", x)

        if self.distilled:
            x = x[:, :2]  # class and distillation tokens, pooled and classified alike
        elif self.classifier == "token":
            x = x[:, 0]
        elif self.classifier == "gap":
            x = jnp.mean(x, axis=1)

        if self.representation_size is not None:
            x = TanhDense(features=self.representation_size, dtype=self.dtype, name="pre_logits")(x)
        else:
            x = IdentityLayer(name="pre_logits")(x)

        head = functools.partial(
            model_heads.head,
            num_classes=self.num_classes,
            hidden_size=self.head_hidden_size,
            bias_init=self.head_bias_init,
            dtype=self.dtype,
        )
        if self.distilled:
            return model_heads.distilled_heads(head, x, features, train=train)
        return head(x, features).astype(jnp.float32)
