"""``delta_decode_step`` (``linearize/kernels/delta/decode.py``): token by token, folding the key that leaves the
window into the state in place, it gives what ``delta_recurrent`` gives over the whole sequence, including rows of a
left-padded batch whose padding keys never enter."""

from __future__ import annotations

import pytest
import torch

from linearize.kernels.delta import delta_decode_step, delta_recurrent
from tests.kernels.conftest import assert_close
from tests.kernels.test_delta_reference import make_inputs


def decode_all(fq, fk, v, beta, log_a, S0, window, entered):
    """Run the steps: at token t the key t - W enters where ``entered[b, t - W]`` (False rows get NaN keys)."""
    T = fq.shape[2]
    state = S0.clone()
    outs_n, outs_d = [], []
    for t in range(T):
        u = t - window
        if u >= 0:
            enter = entered[:, u]
            fk_in, v_in = fk[:, :, u].clone(), v[:, :, u].clone()
            fk_in[~enter] = float("nan")  # a row that takes no key must not read it
            v_in[~enter] = float("nan")
            args = (fk_in, v_in, beta[:, :, u], log_a[:, :, u], enter)
        else:  # nothing leaves the window yet: any key, entering nowhere
            args = (torch.full_like(fk[:, :, 0], float("nan")), v[:, :, 0], beta[:, :, 0], log_a[:, :, 0],
                    torch.zeros(fq.shape[0], dtype=torch.bool))
        L_n, L_d = delta_decode_step(fq[:, :, t : t + 1], state, *args)
        assert L_n.shape == (fq.shape[0], fq.shape[1], 1, v.shape[-1]) and L_d.shape == fq.shape[:2] + (1,)
        outs_n.append(L_n)
        outs_d.append(L_d)
    return torch.cat(outs_n, dim=2), torch.cat(outs_d, dim=2), state


@pytest.mark.parametrize("window", [0, 1, 3])
@pytest.mark.parametrize("Hs", [2, 4])
def test_decode_steps_equal_the_recurrent_reference(window, Hs):
    fq, fk, v, beta, log_a, S0 = (x.detach() for x in make_inputs(T=12, P=0, Hs=Hs))
    L_n, L_d, _ = delta_recurrent(fq, fk, v, beta, log_a, window=window, initial_state=S0)
    entered = torch.ones(2, 12, dtype=torch.bool)
    d_n, d_d, state = decode_all(fq, fk, v, beta, log_a, S0, window, entered)
    assert_close("L_n", L_n, d_n, 1e-5)
    assert_close("L_d", L_d, d_d, 1e-5)
    # After the last step the state holds keys <= T - 1 - W: the final state of a call over T - 1 tokens when
    # W > 0 (it is what token T - 1 + 1 would read after folding one more key), of the whole call when W == 0.
    Tc = 12 - (window > 0)
    final = delta_recurrent(fq[:, :, :Tc], fk[:, :, :Tc], v[:, :, :Tc], beta[:, :, :Tc], log_a[:, :, :Tc],
                            window=window, initial_state=S0, output_final_state=True)[2]
    assert_close("state", final, state, 1e-5)


@pytest.mark.parametrize("window", [0, 2])
def test_padding_keys_that_do_not_enter_equal_identity_updates(window):
    """Row 1 starts with 3 padding tokens: its keys never enter (enter = False) in decode, and are identity updates
    (beta = 0, log_a = 0) in the reference; enter = None folds every row's key."""
    fq, fk, v, beta, log_a, S0 = (x.detach().clone() for x in make_inputs(T=10, P=0))
    entered = torch.ones(2, 10, dtype=torch.bool)
    entered[1, :3] = False
    beta[1, :, :3] = 0.0
    log_a[1, :, :3] = 0.0
    L_n, L_d, _ = delta_recurrent(fq, fk, v, beta, log_a, window=window, initial_state=S0)
    d_n, d_d, _ = decode_all(fq, fk, v, beta, log_a, S0, window, entered)
    assert_close("L_n", L_n, d_n, 1e-5)
    assert_close("L_d", L_d, d_d, 1e-5)

    state = S0.clone()
    delta_decode_step(fq[:, :, :1], state, fk[:, :, 5], v[:, :, 5], beta[:, :, 5], log_a[:, :, 5], None)
    expect = delta_recurrent(fq[:, :, :1], fk[:, :, 5:6], v[:, :, 5:6], beta[:, :, 5:6], log_a[:, :, 5:6], window=0,
                             initial_state=S0, output_final_state=True)[2]
    assert_close("state (enter=None)", expect, state, 1e-6)


def test_decode_step_rejects_a_state_that_is_not_fp32():
    fq, fk, v, beta, log_a, S0 = (x.detach() for x in make_inputs(T=1, P=0))
    with pytest.raises(ValueError, match="state must be fp32"):
        delta_decode_step(fq, S0.double(), fk[:, :, 0], v[:, :, 0], beta[:, :, 0], log_a[:, :, 0])
