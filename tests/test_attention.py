"""Attention backends and the reference-compatible multi-head attention module."""
import math

import pytest
import torch
import torch.nn as nn

from streampetr_plugin import hookimpl
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.models.build import bind_attention_backends
from streampetr_plugin.models.layers.attention import math_attention, sdpa_attention
from streampetr_plugin.models.layers.multihead_attention import MultiheadAttention
from streampetr_plugin.registry import RegistryError
from streampetr_plugin.models.layers.transformer import PETRTemporalDecoderLayer


def _qkv(batch=2, heads=4, queries=7, keys=11, dims=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, dims, generator=gen) for n in (queries, keys, keys))


def test_sdpa_equals_explicit_softmax_without_mask():
    q, k, v = _qkv()
    out = sdpa_attention(q, k, v, attn_mask=None, dropout_p=0.0, training=False)
    expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1) @ v
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(math_attention(q, k, v), expected, atol=1e-5, rtol=0)


def test_sdpa_equals_explicit_softmax_with_blocking_mask():
    q, k, v = _qkv()
    mask = torch.rand(7, 11, generator=torch.Generator().manual_seed(1)) > 0.6
    mask[:, 0] = False  # every query keeps at least one key
    out = sdpa_attention(q, k, v, attn_mask=mask, dropout_p=0.0, training=False)
    torch.testing.assert_close(out, math_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=0)
    # A blocked key has no influence: changing its value leaves the output unchanged.
    blocked_query, blocked_key = torch.nonzero(mask)[0].tolist()
    v_changed = v.clone()
    v_changed[..., blocked_key, :] += 100.0
    out_changed = sdpa_attention(q, k, v_changed, attn_mask=mask, dropout_p=0.0, training=False)
    torch.testing.assert_close(out_changed[..., blocked_query, :], out[..., blocked_query, :])


def test_dropout_is_inactive_outside_training():
    q, k, v = _qkv()
    for backend in (sdpa_attention, math_attention):
        a = backend(q, k, v, attn_mask=None, dropout_p=0.9, training=False)
        b = backend(q, k, v, attn_mask=None, dropout_p=0.0, training=False)
        torch.testing.assert_close(a, b)


def test_registry_holds_the_builtin_backends_and_rejects_duplicates_and_unknown_names():
    backends = create_plugin_host(entry_points=False).registries.attention_backends
    assert {"sdpa", "math", "npu_fusion_attention"} <= set(backends.names())
    assert backends.build("sdpa", {}) is sdpa_attention and backends.build("math", {}) is math_attention
    with pytest.raises(RegistryError, match="registered twice"):
        backends.register("sdpa", lambda: math_attention)
    with pytest.raises(RegistryError, match="unknown attention_backend 'no-such-backend'"):
        backends.get("no-such-backend")


class RecordingBackend:
    """A plugin's attention kernel: records its calls, computes with the math backend."""

    def __init__(self) -> None:
        self.calls = []

    def attend(self, q, k, v, *, attn_mask, dropout_p, training):
        self.calls.append((q.shape, attn_mask is not None, dropout_p, training))
        return math_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, training=training)

    @hookimpl
    def streampetr_register_attention_backends(self, register):
        register("recording", lambda: self.attend)


def test_a_plugin_backend_is_bound_to_the_modules_that_name_it():
    plugin = RecordingBackend()
    host = create_plugin_host(entry_points=False)
    host.register_plugin(plugin, name="recording")
    module = MultiheadAttention(embed_dims=16, num_heads=4, attn_drop=0.1, out_drop=0.1, backend="recording")
    module.eval()
    query, key = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    with pytest.raises(RuntimeError, match="'recording' is not bound"):
        module(query, key, key)
    bind_attention_backends(module, host.registries.attention_backends)
    module(query, key, key)
    assert plugin.calls == [((2, 4, 5, 4), False, 0.1, False)]


def test_the_backend_name_changes_only_with_its_kernel():
    module = MultiheadAttention(embed_dims=16, num_heads=4)
    with pytest.raises(AttributeError):
        module.attn.backend = "math"
    module.attn.use_backend("math", math_attention)
    assert (module.attn.backend, module.attn.attend) == ("math", math_attention)


def test_module_matches_torch_multihead_attention_with_mask():
    torch.manual_seed(0)
    embed_dims, heads = 32, 4
    ours = MultiheadAttention(embed_dims=embed_dims, num_heads=heads).eval()
    reference = nn.MultiheadAttention(embed_dims, heads, batch_first=True).eval()
    ours.attn.load_state_dict(reference.state_dict())
    query = torch.randn(2, 6, embed_dims)
    key, value = torch.randn(2, 10, embed_dims), torch.randn(2, 10, embed_dims)
    query_pos, key_pos = torch.randn(2, 6, embed_dims), torch.randn(2, 10, embed_dims)
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[:3, 5:] = True
    expected = query + reference(query + query_pos, key + key_pos, value, attn_mask=mask)[0]
    for name, backend in (("sdpa", sdpa_attention), ("math", math_attention)):
        ours.attn.use_backend(name, backend)
        out = ours(query, key, value, query_pos=query_pos, key_pos=key_pos, attn_mask=mask)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_parameter_names_follow_the_reference():
    module = MultiheadAttention(embed_dims=16, num_heads=2)
    assert sorted(module.state_dict()) == [
        "attn.in_proj_bias",
        "attn.in_proj_weight",
        "attn.out_proj.bias",
        "attn.out_proj.weight",
    ]


def _dropout_in_use(module, training):
    """(attention-probability dropout the backend receives, output dropout probability) in a forward."""
    seen = {}

    def recording(q, k, v, *, attn_mask, dropout_p, training):
        seen["attn_drop"] = dropout_p if training else 0.0
        return math_attention(q, k, v, attn_mask=attn_mask)

    module.attn.use_backend("dropout-probe", recording)
    module.train(training)
    module(torch.randn(1, 3, 16), torch.randn(1, 4, 16), torch.randn(1, 4, 16))
    return seen["attn_drop"], module.out_drop.p if module.out_drop.training else 0.0


def test_decoder_layer_dropout_semantics():
    layer = PETRTemporalDecoderLayer(embed_dims=16, num_heads=2, feedforward_channels=32, dropout=0.1)
    self_attn, cross_attn = layer.attentions
    # Self-attention: probability dropout 0.1 and output dropout 0.1 in training.
    assert _dropout_in_use(self_attn, training=True) == (0.1, 0.1)
    # Cross-attention: no probability dropout (the reference's flash attention), output dropout 0.1.
    assert _dropout_in_use(cross_attn, training=True) == (0.0, 0.1)
    assert _dropout_in_use(self_attn, training=False) == (0.0, 0.0)


def test_output_dropout_acts_in_training_only_and_identity_has_no_position():
    torch.manual_seed(0)
    module = MultiheadAttention(embed_dims=16, num_heads=2, attn_drop=0.0, out_drop=0.5)
    query, key = torch.randn(1, 64, 16), torch.randn(1, 8, 16)
    query_pos = torch.randn(1, 64, 16)
    module.eval()
    attended = module(query, key, key, query_pos=query_pos) - query  # the residual has no position
    expected = module.attn(query + query_pos, key, key)
    torch.testing.assert_close(attended, expected)
    module.train()
    dropped = module(query, key, key, query_pos=query_pos) - query
    zero_fraction = (dropped == 0).float().mean().item()
    assert 0.3 < zero_fraction < 0.7
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2.0 * expected[kept])
