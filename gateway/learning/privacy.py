"""The gateway's cumulative privacy account for DP-SGD rounds.

Every training round is a subsampled Gaussian mechanism described by its noise
multiplier (sigma), Poisson sampling rate (q) and number of steps. The account keeps
that history in its own SQLite file and recomputes epsilon from the whole history
each time it is asked; it never keeps a running counter that could drift.

The arithmetic is Renyi DP of the sampled Gaussian mechanism at integer orders
(Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian
Mechanism", arXiv:1908.10530, section 3.3), composed by adding RDP per order, and
converted to (epsilon, delta) with Balle et al. 2020, "Hypothesis testing
interpretations and Renyi differential privacy", Theorem 21 (arXiv:1905.09982).
Integer orders only give an upper bound that is at most a few percent above a grid
with fractional orders: the account may over-count, never under-count.

This module imports numpy and scipy only: opacus would pull torch into the agent.
"""

from __future__ import annotations

import functools
import logging
import math
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import special

from gateway.clock import Clock, SystemClock
from gateway.errors import ExitCode, GatewayError

log = logging.getLogger(__name__)

ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 128, 192, 256)
"""Integer RDP orders (alphas) over which epsilon is minimised."""

Mechanism = tuple[float, float, int]
"""One round as (noise_multiplier, sample_rate, steps)."""


class BudgetExceeded(GatewayError):
    """A round would take the gateway's epsilon past its cap; it was not started.

    Attributes:
        left: Epsilon still available before the cap.
        would_be: Epsilon the history would reach with the refused round.
    """

    exit_code = ExitCode.PRIVACY_BUDGET_EXCEEDED

    def __init__(self, left: float, would_be: float, epsilon_max: float) -> None:
        self.left = left
        self.would_be = would_be
        self.epsilon_max = epsilon_max
        super().__init__(
            f"privacy budget: {left:.4f} of epsilon {epsilon_max:g} left, this round "
            f"would reach {would_be:.4f}; raise the noise multiplier, run fewer "
            "steps, or stop training on this gateway"
        )


def rdp_sampled_gaussian(sigma: float, q: float, steps: int) -> np.ndarray:
    """RDP of `steps` sampled Gaussian steps at every order in `ORDERS`.

    Examples:
        Without subsampling the Gaussian mechanism has RDP alpha / (2 sigma^2):

        >>> float(rdp_sampled_gaussian(1.0, 1.0, 1)[0])  # alpha = 2
        1.0
        >>> float(rdp_sampled_gaussian(2.0, 1.0, 10)[0])
        2.5
        >>> float(rdp_sampled_gaussian(1.0, 0.0, 100).max())  # nobody sampled
        0.0
    """
    if q == 0 or steps == 0:
        return np.zeros(len(ORDERS))
    if sigma == 0:
        return np.full(len(ORDERS), np.inf)
    alphas = np.asarray(ORDERS, dtype=float)
    if q == 1:
        return steps * alphas / (2 * sigma**2)
    return steps * np.array(_rdp_one_step(sigma, q))


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(sigma: float, q: float) -> tuple[float, ...]:
    """RDP of one subsampled step per order; cached: histories repeat (sigma, q)."""
    return tuple(_log_a(q, sigma, a) / (a - 1) for a in ORDERS)


def _log_a(q: float, sigma: float, alpha: int) -> float:
    """Log of A_alpha for integer alpha (arXiv:1908.10530, section 3.3)."""
    i = np.arange(alpha + 1, dtype=float)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(i + 1)
    log_binom -= special.gammaln(alpha - i + 1)
    terms = log_binom + i * math.log(q) + (alpha - i) * math.log1p(-q)
    terms += (i * i - i) / (2 * sigma**2)
    return float(special.logsumexp(terms))


def epsilon(mechanisms: Iterable[Mechanism], delta: float) -> float:
    """Epsilon at `delta` of the composition of every mechanism in the list.

    Examples:
        >>> epsilon([], 1e-5)
        0.0
        >>> round(epsilon([(1.1, 0.01, 1000)], 1e-5), 3)
        1.725
        >>> round(epsilon([(1.1, 0.01, 500), (1.1, 0.01, 500)], 1e-5), 3)
        1.725
        >>> epsilon([(0.0, 0.1, 10)], 1e-5)  # no noise: no privacy
        inf
    """
    rdp = np.zeros(len(ORDERS))
    for sigma, q, steps in mechanisms:
        rdp = rdp + rdp_sampled_gaussian(sigma, q, steps)
    if not rdp.any():
        return 0.0
    alphas = np.asarray(ORDERS, dtype=float)
    # Balle et al. 2020, Theorem 21: tighter than the classic rdp + log(1/d)/(a-1).
    eps = rdp - (math.log(delta) + np.log(alphas)) / (alphas - 1)
    eps += np.log((alphas - 1) / alphas)
    return max(0.0, float(np.min(eps)))


def noise_for_target(
    history: Sequence[Mechanism],
    q: float,
    steps: int,
    *,
    target: float,
    delta: float,
) -> float:
    """Smallest noise multiplier (to 1e-3) keeping the history's epsilon <= target.

    Raises:
        BudgetExceeded: If even a very large multiplier (1000) cannot stay under.

    Examples:
        >>> sigma = noise_for_target([], 0.01, 1000, target=1.725, delta=1e-5)
        >>> 1.099 < sigma <= 1.101
        True
    """
    history = list(history)
    low, high = 0.0, 1000.0
    if epsilon([*history, (high, q, steps)], delta) > target:
        would_be = epsilon([*history, (high, q, steps)], delta)
        left = target - epsilon(history, delta)
        raise BudgetExceeded(max(0.0, left), would_be, target)
    while high - low > 1e-3:
        mid = (low + high) / 2
        if epsilon([*history, (mid, q, steps)], delta) > target:
            low = mid
        else:
            high = mid
    return high


@dataclass(frozen=True)
class Round:
    """One training round as recorded in the account."""

    id: int
    started_at: float
    finished_at: float | None
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    status: str

    @property
    def mechanism(self) -> Mechanism:
        """The round as (noise_multiplier, sample_rate, steps)."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    finished_at REAL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    epsilon_after REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'spent', 'aborted'))
)
"""


class PrivacyAccount:
    """One gateway's cumulative (epsilon, delta) account, persisted in SQLite.

    Every recorded round counts, whatever its status: a 'reserved' round whose
    process died counts with all its planned steps, so a crash never under-counts.
    """

    def __init__(
        self,
        path: Path,
        *,
        epsilon_max: float,
        delta: float,
        clock: Clock | None = None,
    ) -> None:
        self.path = Path(path)
        self.epsilon_max = epsilon_max
        self.delta = delta
        self._clock = clock or SystemClock()
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Budget records must survive a power cut: FULL, never NORMAL or OFF.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def __enter__(self) -> PrivacyAccount:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def history(self) -> list[Round]:
        """Every recorded round, oldest first."""
        rows = self._db.execute(
            "SELECT id, started_at, finished_at, noise_multiplier, sample_rate,"
            " steps, epsilon_after, status FROM rounds ORDER BY id"
        ).fetchall()
        return [Round(*row) for row in rows]

    def mechanisms(self, *, exclude: int | None = None) -> list[Mechanism]:
        """The history as mechanisms, optionally without one round."""
        return [r.mechanism for r in self.history() if r.id != exclude]

    def spent(self) -> float:
        """Epsilon spent so far, recomputed from the whole history."""
        return epsilon(self.mechanisms(), self.delta)

    def would_spend(
        self, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Epsilon the history would reach with one more such round."""
        mechanism = (noise_multiplier, sample_rate, steps)
        return epsilon([*self.mechanisms(), mechanism], self.delta)

    def reserve(self, noise_multiplier: float, sample_rate: float, steps: int) -> int:
        """Record a round as spent before it runs, and return its id.

        Raises:
            BudgetExceeded: If the round would take epsilon past `epsilon_max`;
                nothing is recorded then.
            ValueError: If the round is not a private mechanism (sigma <= 0).
        """
        if noise_multiplier <= 0 or not 0 < sample_rate <= 1 or steps < 0:
            raise ValueError("a private round needs sigma > 0, 0 < q <= 1, steps >= 0")
        # IMMEDIATE takes the write lock first: two reservers cannot both fit.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            round_id = self._insert(noise_multiplier, sample_rate, steps)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        log.info("privacy round %d reserved: %d steps", round_id, steps)
        return round_id

    def _insert(self, noise_multiplier: float, sample_rate: float, steps: int) -> int:
        """Insert a reserved round if it fits under the cap (inside a transaction)."""
        would_be = self.would_spend(noise_multiplier, sample_rate, steps)
        if would_be > self.epsilon_max:
            left = max(0.0, self.epsilon_max - self.spent())
            raise BudgetExceeded(left, would_be, self.epsilon_max)
        cursor = self._db.execute(
            "INSERT INTO rounds (started_at, noise_multiplier, sample_rate, steps,"
            " epsilon_after, status) VALUES (?, ?, ?, ?, ?, 'reserved')",
            (self._clock.now(), noise_multiplier, sample_rate, steps, would_be),
        )
        return int(cursor.lastrowid)

    def finish(self, round_id: int, steps_run: int) -> float:
        """Mark a round spent with the steps that really ran; return epsilon now.

        Raises:
            ValueError: If the round is unknown, not reserved, or ran more steps
                than it reserved (that would be spending without a reservation).
        """
        return self._close_round(round_id, steps_run, "spent")

    def abort(self, round_id: int, steps_run: int) -> float:
        """Mark a round aborted; the steps that ran before it stopped still count.

        Raises:
            ValueError: As for `finish`.
        """
        return self._close_round(round_id, steps_run, "aborted")

    def _close_round(self, round_id: int, steps_run: int, status: str) -> float:
        """Record the final steps and status of a reserved round."""
        row = self._db.execute(
            "SELECT steps, status FROM rounds WHERE id = ?", (round_id,)
        ).fetchone()
        if row is None or row[1] != "reserved":
            raise ValueError(f"round {round_id} is not a reserved round")
        if not 0 <= steps_run <= row[0]:
            raise ValueError(
                f"round {round_id} reserved {row[0]} steps, not {steps_run}"
            )
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute(
            "UPDATE rounds SET steps = ?, status = ?, finished_at = ? WHERE id = ?",
            (steps_run, status, self._clock.now(), round_id),
        )
        upto = [r.mechanism for r in self.history() if r.id <= round_id]
        after = epsilon(upto, self.delta)
        self._db.execute(
            "UPDATE rounds SET epsilon_after = ? WHERE id = ?", (after, round_id)
        )
        self._db.execute("COMMIT")
        spent = self.spent()
        log.info("privacy round %d %s: %d steps", round_id, status, steps_run)
        return spent
