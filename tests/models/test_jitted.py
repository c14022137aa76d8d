"""The evaluation caches of compiled functions are keyed by model value: the same
or an equal model reuses the compiled function (no second trace), a model of
another config never gets an earlier model's function, and the caches are bounded."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.evaluate import retrieval, zeroshot
from mmjax.families import captioning
from mmjax.models.jitted import ModelKey, model_method

TRACES = []  # one entry per trace of a `_Tiny` method (a Python side effect)


class _Tiny(nn.Module):
    """A model with a dict field, as mmjax's (which makes flax modules unhashable)."""
    width: int
    cfg: dict

    @nn.compact
    def __call__(self, x):
        TRACES.append(("call", self.width))
        return nn.Dense(self.width, name="dense")(x)

    def encode_image(self, x):
        TRACES.append(("encode_image", self.width))
        return self(x)

    def decode(self, text, image_tokens):
        """`[n, L]` ids -> logits `[n, L, width]` (uses the image tokens)."""
        TRACES.append(("decode", self.width))
        x = jax.nn.one_hot(text, 3) + image_tokens.mean(1, keepdims=True)[..., :3]
        return self(x)


def _variables(model):
    """Initial variables (the `init` trace is not counted)."""
    n = len(TRACES)
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    del TRACES[n:]
    return variables


def _traces(kind):
    return sum(1 for k, _ in TRACES if k == kind)


def test_model_key_compares_by_value():
    a, b, c = _Tiny(4, {"x": [1, 2]}), _Tiny(4, {"x": [1, 2]}), _Tiny(5, {"x": [1, 2]})
    assert ModelKey(a) == ModelKey(b) and hash(ModelKey(a)) == hash(ModelKey(b))
    assert ModelKey(a) != ModelKey(c)
    assert ModelKey(a) != ModelKey(_Tiny(4, {"x": [1, 3]}))


def test_model_method_reuses_compiled_function_for_equal_models():
    model_method.cache_clear()  # new functions: traced here whatever ran before
    TRACES.clear()
    model = _Tiny(4, {"depth": 2})
    variables, x = _variables(model), jnp.ones((2, 3))
    fn = model_method(model, "__call__")
    jax.jit(fn)(variables, x)
    assert _traces("call") == 1
    # The same model, then an equal one built anew: the same function, no trace.
    assert model_method(model, "__call__") is fn
    again = _Tiny(4, {"depth": 2})
    assert model_method(again, "__call__") is fn
    jax.jit(model_method(again, "__call__"))(variables, x)
    assert _traces("call") == 1
    # Another config: another function, traced for its own shapes.
    other = _Tiny(5, {"depth": 2})
    fn5 = model_method(other, "__call__")
    assert fn5 is not fn
    out = jax.jit(fn5)(_variables(other), x)
    assert out.shape == (2, 5) and _traces("call") == 2
    # Only the dict field differs: not the old function either.
    assert model_method(_Tiny(4, {"depth": 3}), "__call__") is not fn


def test_model_method_cache_is_bounded():
    maxsize = model_method.cache_info().maxsize
    assert maxsize is not None
    for width in range(maxsize + 2):
        model_method(_Tiny(100 + width, {}), "__call__")
    assert model_method.cache_info().currsize <= maxsize


def test_zero_shot_topk_function_per_model_value():
    model_method.cache_clear()
    zeroshot._topk_fn.cache_clear()
    TRACES.clear()
    model = _Tiny(4, {"depth": 2})
    variables, images = _variables(model), jnp.ones((2, 3))
    classifier = jnp.eye(4)
    fn = zeroshot._topk_fn(model, 2)
    jax.jit(fn)((variables, classifier), images)
    assert zeroshot._topk_fn(_Tiny(4, {"depth": 2}), 2) is fn
    jax.jit(zeroshot._topk_fn(_Tiny(4, {"depth": 2}), 2))((variables, classifier), images)
    assert _traces("encode_image") == 1
    assert zeroshot._topk_fn(model, 3) is not fn
    other = _Tiny(5, {"depth": 2})
    top = jax.jit(zeroshot._topk_fn(other, 5))((_variables(other), jnp.eye(5)), images)
    assert zeroshot._topk_fn(other, 2) is not fn
    assert top.shape == (2, 5) and _traces("encode_image") == 2


def test_itm_score_function_per_model_value():
    model = _Tiny(4, {})
    fn = retrieval._itm_score_fn(model, "prob")
    assert retrieval._itm_score_fn(_Tiny(4, {}), "prob") is fn
    assert retrieval._itm_score_fn(model, "logit") is not fn
    assert retrieval._itm_score_fn(_Tiny(6, {}), "prob") is not fn


def test_caption_decode_compiles_once_per_model_value():
    TRACES.clear()
    prefix = np.ones((2, 1), np.int32)
    tokens = jnp.ones((2, 3, 3))

    def decode(model):
        fn = captioning.CaptionStepFn(model, "decode", False, _variables(model), tokens)
        return captioning.greedy_decode(fn, prefix, max_len=4, eos_id=99, pad_id=0,
                                        use_cache=False)

    # (Widths used by no other test: the compiled decode is cached process-wide.)
    first = decode(_Tiny(7, {"depth": 2}))
    n = _traces("decode")
    assert n >= 1
    # An equal model built anew: the compiled decode is reused (no trace).
    np.testing.assert_array_equal(decode(_Tiny(7, {"depth": 2})), first)
    assert _traces("decode") == n
    # Another config: traced again (its logits have another vocabulary).
    decode(_Tiny(8, {"depth": 2}))
    assert _traces("decode") > n
