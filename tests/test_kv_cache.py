"""The KV cache: preallocated, written in place, rows as views."""

from __future__ import annotations

from slm.generation import Engine, SamplingParams
from slm.kv_cache import KVCache

CONTEXT = 64  # the tiny preset's


def test_kv_cache_is_written_in_place(tiny_model):
    engine = Engine(tiny_model, max_batch=2)
    k_ptr, v_ptr = engine.cache.k.data_ptr(), engine.cache.v.data_ptr()
    engine.add([1, 2, 3], SamplingParams(max_new_tokens=3 * CONTEXT, temperature=0))
    while engine.active:
        engine.step()
    assert (engine.cache.k.data_ptr(), engine.cache.v.data_ptr()) == (k_ptr, v_ptr)
    c = tiny_model.config
    assert engine.cache.k.shape == (3, 2, c.kv_heads, CONTEXT, c.head_dim)


def test_kv_cache_rows_are_views():
    cache = KVCache(n_layer=2, batch_size=4, n_head=2, max_len=8, head_dim=4)
    view = cache.rows(1, 3)
    view.lengths += 2
    assert cache.lengths.tolist() == [0, 2, 2, 0]
    assert view.k.data_ptr() == cache.k[:, 1].data_ptr()
