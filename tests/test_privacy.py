"""The privacy account: arithmetic against dp-accounting, persistence, the cap."""

from __future__ import annotations

import contextlib
import doctest

import pytest
from dp_accounting import dp_event, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.learning import privacy
from gateway.learning.privacy import BudgetExceeded, PrivacyAccount, epsilon

DELTA = 1e-5


def reference_epsilon(history, orders) -> float:
    accountant = rdp.RdpAccountant(orders=list(orders))
    for sigma, q, steps in history:
        event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
        accountant.compose(event, steps)
    return accountant.get_epsilon(DELTA)


HISTORIES = [
    [(1.1, 0.01, 1000)],
    [(0.8, 0.05, 200), (1.5, 0.02, 500)],
    [(2.0, 0.1, 30), (2.0, 0.1, 30), (4.0, 0.25, 12)],
    [(1.0, 1.0, 5)],
    [(0.6, 0.001, 10_000)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_epsilon_matches_dp_accounting_on_same_orders(history):
    # Same integer orders: the two implementations must agree to 1e-6 relative.
    ours = epsilon(history, DELTA)
    assert ours == pytest.approx(reference_epsilon(history, privacy.ORDERS), rel=1e-6)


@pytest.mark.parametrize("history", HISTORIES)
def test_epsilon_is_at_most_6_percent_above_fractional_orders(history):
    # dp-accounting's default grid adds fractional orders; ours may only over-count
    # (most at small sigma, where the best order lies between integers).
    reference = reference_epsilon(
        history, rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    )
    ours = epsilon(history, DELTA)
    assert reference - 1e-9 <= ours <= reference * 1.06


def test_doctests_of_the_arithmetic_pass():
    failed, attempted = doctest.testmod(privacy)
    assert attempted >= 8
    assert failed == 0


def test_spent_and_history_survive_a_restart(tmp_path):
    path = tmp_path / "privacy.db"
    account = PrivacyAccount(path, epsilon_max=5.0, delta=DELTA)
    first = account.reserve(1.0, 0.1, 30)
    account.finish(first, 30)
    spent = account.spent()
    account.close()

    again = PrivacyAccount(path, epsilon_max=5.0, delta=DELTA)
    assert again.spent() == pytest.approx(spent)
    assert [r.status for r in again.history()] == ["spent"]
    assert again.history()[0].epsilon_after == pytest.approx(spent)


def test_cap_holds_across_restarts(tmp_path):
    path = tmp_path / "privacy.db"
    cap = epsilon([(1.0, 0.1, 30)] * 2, DELTA) + 1e-9
    for _ in range(2):
        account = PrivacyAccount(path, epsilon_max=cap, delta=DELTA)
        account.finish(account.reserve(1.0, 0.1, 30), 30)
        account.close()

    account = PrivacyAccount(path, epsilon_max=cap, delta=DELTA)
    with pytest.raises(BudgetExceeded) as refused:
        account.reserve(1.0, 0.1, 30)
    assert len(account.history()) == 2
    assert refused.value.left == pytest.approx(cap - account.spent(), abs=1e-9)
    assert refused.value.would_be == pytest.approx(epsilon([(1.0, 0.1, 30)] * 3, DELTA))


def test_budget_exceeded_says_how_much_is_left(tmp_path):
    account = PrivacyAccount(tmp_path / "p.db", epsilon_max=1.0, delta=DELTA)
    with pytest.raises(BudgetExceeded, match=r"1\.0000 of epsilon 1 left") as refused:
        account.reserve(0.5, 0.5, 100)
    assert isinstance(refused.value, GatewayError)
    assert refused.value.left == 1.0
    assert refused.value.would_be > 1.0


def test_reserved_round_of_a_crashed_process_still_counts(tmp_path):
    path = tmp_path / "privacy.db"
    account = PrivacyAccount(path, epsilon_max=10.0, delta=DELTA)
    account.reserve(1.0, 0.1, 50)
    account.close()  # the process "dies" before finish()

    again = PrivacyAccount(path, epsilon_max=10.0, delta=DELTA)
    assert [r.status for r in again.history()] == ["reserved"]
    assert again.spent() == pytest.approx(epsilon([(1.0, 0.1, 50)], DELTA))


def test_finish_with_fewer_steps_recomputes(tmp_path):
    account = PrivacyAccount(tmp_path / "p.db", epsilon_max=10.0, delta=DELTA)
    round_id = account.reserve(1.0, 0.1, 50)
    reserved = account.spent()
    assert account.finish(round_id, 20) == pytest.approx(
        epsilon([(1.0, 0.1, 20)], DELTA)
    )
    assert account.spent() < reserved
    assert account.history()[0].steps == 20


def test_aborted_round_counts_the_steps_it_ran(tmp_path):
    account = PrivacyAccount(tmp_path / "p.db", epsilon_max=10.0, delta=DELTA)
    round_id = account.reserve(1.0, 0.1, 50)
    account.abort(round_id, 7)
    assert account.history()[0].status == "aborted"
    assert account.spent() == pytest.approx(epsilon([(1.0, 0.1, 7)], DELTA))


def test_finish_refuses_more_steps_than_reserved(tmp_path):
    account = PrivacyAccount(tmp_path / "p.db", epsilon_max=10.0, delta=DELTA)
    round_id = account.reserve(1.0, 0.1, 10)
    with pytest.raises(ValueError, match="reserved 10 steps"):
        account.finish(round_id, 11)


def test_noise_for_target_lands_just_under_the_target():
    sigma = privacy.noise_for_target([(1.0, 0.1, 30)], 0.1, 30, target=6.0, delta=DELTA)
    assert epsilon([(1.0, 0.1, 30), (sigma, 0.1, 30)], DELTA) <= 6.0
    assert epsilon([(1.0, 0.1, 30), (sigma - 0.002, 0.1, 30)], DELTA) > 6.0


mechanisms = st.tuples(st.floats(0.5, 5.0), st.floats(0.001, 1.0), st.integers(0, 300))


@settings(max_examples=40, deadline=None)
@given(st.lists(mechanisms, max_size=6), mechanisms)
def test_epsilon_is_monotone_in_history(history, extra):
    assert epsilon([*history, extra], DELTA) >= epsilon(history, DELTA)


@settings(max_examples=15, deadline=None)
@given(st.floats(0.5, 8.0), st.lists(mechanisms, min_size=1, max_size=8))
def test_spending_never_exceeds_the_cap(tmp_path_factory, cap, rounds):
    path = tmp_path_factory.mktemp("cap") / "p.db"
    account = PrivacyAccount(path, epsilon_max=cap, delta=DELTA)
    for sigma, q, steps in rounds:
        with contextlib.suppress(BudgetExceeded):
            account.finish(account.reserve(sigma, q, steps), steps)
        assert account.spent() <= cap
    account.close()
