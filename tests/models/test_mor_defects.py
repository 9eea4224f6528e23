"""Mixture-of-Recursions defects found by an independent check (issue 18), each pinned by a test
that failed on the code before its fix: KV-share updates with a routed first recursion, router
training at every step that decides at inference, the official capacity rounding, auxiliary
router and auxiliary loss as alternatives, padding kept out of the selection, the router's init
std."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.config import RecursionConfig
from jaxeff.ops import routing
from tests.models.test_recursive import SEG, _both_paths, _forward, _model, _tokens


def _routed(caps: str, **kw):
    model = _model(5, seed=1, strategy="middle_cycle", n_recursions=3, routing="expert", router_alpha=0.5,
                   capacities=caps, **kw)
    model.router.w[...] = model.router.w[...] * 60.0  # decisions far from ties
    return model


@pytest.mark.parametrize("caps", ["0.75,0.5,0.25", "0.5,0.5,0.25"])
def test_share_update_with_a_routed_first_recursion_agrees_across_paths(caps):
    """The overwrite index is each token's rank among the first step's tokens, not its position
    (before the fix the two paths differed by 0.17-0.39 in the logits)."""
    model = _routed(caps, kv_strategy="share", kv_share_update=True)
    tokens = jnp.asarray(_tokens(3, 2, 20))
    (compact, _), (masked, _) = _both_paths(model, tokens, None, None)
    np.testing.assert_allclose(np.asarray(compact), np.asarray(masked), rtol=1e-4, atol=1e-4)


def test_every_router_that_decides_at_inference_is_trained():
    """With capacities (1, 0.5, 0.5) step 3 keeps every candidate in training but prunes by the
    threshold at inference: it gets its BCE (all-ones targets) and sampling accuracy too."""
    model = _routed("1,0.5,0.5")
    _, aux = _forward(model, _tokens(5, 2, 16))
    for r in (2, 3):
        assert f"loss/router_bce_r{r}" in aux and f"mor/sampling_acc_r{r}" in aux, r
    assert "loss/router_bce_r1" not in aux  # capacity 1: step 1 never prunes


def test_capacity_rounding_follows_the_official_rule():
    assert routing.tokens_for_capacity(0.7, 90) == 62  # int(0.7 * 90) with 0.7 * 90 = 62.99999999999999


@pytest.mark.parametrize("aux_router", [False, True])
def test_aux_router_and_aux_loss_are_alternatives(aux_router):
    model = _routed("1,0.5,0.25", aux_router=aux_router)
    _, aux = _forward(model, _tokens(6, 2, 16))
    losses = {k for k in aux if k.startswith("loss/")}
    if aux_router:
        assert losses == {"loss/aux_router_r2", "loss/aux_router_r3"}
    else:
        assert losses == {"loss/router_bce_r2", "loss/router_bce_r3"}


def test_padding_takes_no_part_in_a_step():
    """A row with fewer real tokens than k: the padding that fills its top-k slots is left
    unchanged, as the masked path does (before the fix the compacted path updated it)."""
    model = _routed("1,0.75,0.5")
    seg = np.asarray(SEG).copy()
    seg[1, 6:] = 0  # row 1: 6 real tokens, fewer than k = 10 at step 3
    (compact, _), (masked, _) = _both_paths(model, jnp.asarray(_tokens(7, 2, 20)), jnp.asarray(seg), None)
    np.testing.assert_allclose(np.asarray(compact), np.asarray(masked), rtol=1e-4, atol=1e-4)


def test_router_init_std_follows_the_model_config():
    model = _model(5, seed=2, model_kw=dict(init_std=0.5), strategy="middle_cycle", n_recursions=3,
                   routing="expert", aux_router=True)
    assert abs(float(np.std(np.asarray(model.router.w[...]))) - 0.5) < 0.1
    assert abs(float(np.std(np.asarray(model.router.aux_w[...]))) - 0.5) < 0.1
    token = _model(5, seed=2, model_kw=dict(init_std=0.5), strategy="middle_cycle", n_recursions=3, routing="token")
    assert abs(float(np.std(np.asarray(token.router.w[...]))) - 0.5) < 0.1


def test_config_still_validates_capacities():
    with pytest.raises(ValueError, match="capacities"):
        RecursionConfig(strategy="middle_cycle", n_recursions=3, routing="expert", capacities="1,0.5")
