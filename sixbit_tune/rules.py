"""The DMPQ and Temporal Delta Cache decision rules, as pure functions (standard library only).

These are the one definition of both rules: the runtime's controller decides with them at inference, and the
dashboard replays a policy on profiled statistics with them. They see plain Python floats, one value per batch row
(a row is one (prompt, guidance branch)); they hold no state and touch no tensor.

* **DMPQ.** At step ``t`` a dynamic layer takes its fast route iff ``alpha * gamma + beta <= threshold`` for the
  Γ of *every* row, where Γ is its block's Γ at its most recent full computation before ``t`` (normally ``t − 1``).
  Without such a Γ (the first step) the layer runs the policy's first-step format (the robust route by default).
  The same rule, with its own threshold, chooses a block's attention format.
* **TDC.** Block ``l`` is skipped at step ``t`` iff the tolerance is positive, ``t`` lies in the window
  ``warmup <= t < num_steps - cooldown``, the block may cache, it has a cached Δ and a measured per-step change
  rate, it has been skipped fewer than ``max_skips`` times in a row, and for *every* row the change accumulated
  since its last full computation plus the rate stays ``<= tolerance``. That is the joint rule a batched call of several rows
  (batched classifier-free guidance: ``[uncond rows; cond rows]``) takes by default; with the per-row rule
  (:func:`tdc_skip_rows`) each row is decided alone, from its own accumulated change, rate and consecutive skips,
  and the block is computed on the rows that are not skipped only. Tolerance 0 never skips; the cap on
  consecutive skips and the per-step accumulation rule out skipping forever.
* **TDC output.** A skipped block returns ``X + Δ_last`` (its Δ of its last full computation, at step ``s``), or,
  with ``tdc.extrapolate = 1``, ``X + tdc_extrapolate(Δ_last, Δ_prev, t − s, s − s_prev)`` where ``Δ_prev`` is the
  Δ of the full computation before that (at step ``s_prev``): the first-order extrapolation
  ``Δ_last + (Δ_last − Δ_prev) · k / gap``.
* **Refresh.** With ``tdc.refresh_robust = 1`` the first full computation of a block after one or more skips runs
  every dynamic layer of the block on the robust route, whatever its predictor says.
"""

from __future__ import annotations

from collections.abc import Sequence

FAST_FORMAT = "nvfp4"
ROBUST_FORMAT = "int8"


# ------------------------------------------------------------------------------------------------ DMPQ


def dmpq_fast(alpha: float, beta: float, gamma_prev: Sequence[float] | None, threshold: float) -> bool:
    """Whether a dynamic layer takes its fast route.

    Args:
        alpha, beta: the layer's predictor (predicted error = ``alpha * gamma + beta``).
        gamma_prev: Γ of the layer's block at its most recent full computation before this step, one value per
            batch row; None or empty when there is none yet (then the answer is False: see :func:`dmpq_format`
            for the first-step format).
        threshold: τ (may be ±inf).

    Returns:
        True iff ``gamma_prev`` holds at least one value and ``alpha * g + beta <= threshold`` for every ``g`` in it
        (a NaN Γ gives False).
    """
    if not gamma_prev:
        return False
    return all(alpha * g + beta <= threshold for g in gamma_prev)


def dmpq_format(
    alpha: float,
    beta: float,
    gamma_prev: Sequence[float] | None,
    threshold: float,
    first_step_format: str = ROBUST_FORMAT,
    *,
    fast: str = FAST_FORMAT,
    robust: str = ROBUST_FORMAT,
) -> str:
    """The format a dynamic layer runs at this step.

    Args:
        alpha, beta, gamma_prev, threshold: as in :func:`dmpq_fast`.
        first_step_format: the format where ``gamma_prev`` is None or empty (the policy's
            ``dmpq.first_step_format``).
        fast, robust: the two routes' format names.

    Returns:
        ``first_step_format`` without Γ; else ``fast`` if :func:`dmpq_fast` holds, ``robust`` otherwise.
    """
    if not gamma_prev:
        return first_step_format
    return fast if dmpq_fast(alpha, beta, gamma_prev, threshold) else robust


def dmpq_formats(
    alphas: Sequence[float],
    betas: Sequence[float],
    gamma_prev: Sequence[float] | None,
    threshold: float,
    first_step_format: str = ROBUST_FORMAT,
    *,
    refresh_robust: bool = False,
) -> list[str]:
    """:func:`dmpq_format` for every dynamic layer of one block (``alphas[i]``, ``betas[i]`` of layer ``i``), which
    all share the block's ``gamma_prev``.

    ``refresh_robust``: this call is the block's first full computation after a skip and the policy asks for a
    robust refresh (``tdc.refresh_robust``): every layer takes :data:`ROBUST_FORMAT`.
    """
    if len(alphas) != len(betas):
        raise ValueError(f"{len(alphas)} alphas but {len(betas)} betas")
    if refresh_robust:
        return [ROBUST_FORMAT] * len(alphas)
    return [dmpq_format(a, b, gamma_prev, threshold, first_step_format) for a, b in zip(alphas, betas)]


# ------------------------------------------------------------------------------------------------ TDC


def tdc_in_window(step: int, warmup: int, cooldown: int, num_steps: int | None) -> bool:
    """Whether step ``step`` (0-based) lies in the window where blocks may be skipped.

    Args:
        step: the denoising step.
        warmup: no skips in the first ``warmup`` steps.
        cooldown: no skips in the last ``cooldown`` steps.
        num_steps: the run's number of denoising steps; None when unknown.

    Returns:
        ``warmup <= step < num_steps - cooldown``. With ``num_steps`` unknown the end of the window is unknown:
        True iff ``cooldown == 0`` and ``step >= warmup``.
    """
    if step < warmup:
        return False
    if num_steps is None:
        return cooldown == 0
    return step < num_steps - cooldown


def tdc_may_skip_later(step: int, cooldown: int, num_steps: int | None) -> bool:
    """Whether some step after ``step`` may still be skipped (so a block computed now should keep its Δ):
    ``step + 1 < num_steps - cooldown``; with ``num_steps`` unknown, True iff ``cooldown == 0``.
    The same as ``tdc_in_window(step + 1, 0, cooldown, num_steps)``."""
    return tdc_in_window(step + 1, 0, cooldown, num_steps)


def tdc_rate(change: Sequence[float], gap: int) -> list[float]:
    """Per-step change rate of a block, per row: the change of Δ between its two most recent full computations
    (``gap`` steps apart) spread evenly over the gap, ``change / max(1, gap)``."""
    g = max(1, int(gap))
    return [v / g for v in change]


def tdc_skip(
    accumulated: Sequence[float] | None,
    rate: Sequence[float] | None,
    consecutive: int,
    *,
    tolerance: float,
    max_skips: int,
    in_window: bool,
    has_cache: bool,
    cacheable: bool = True,
    rows: int | None = None,
) -> list[float] | None:
    """The TDC decision for one block at one step.

    Args:
        accumulated: per row, the change accumulated since the block's last full computation (None or empty:
            0 for every row, as right after a full computation).
        rate: per row, the block's last measured per-step change (:func:`tdc_rate`); None before it was measured
            (a block needs two full computations for it).
        consecutive: how many steps in a row the block has been skipped just before this one.
        tolerance: δ; 0 (or less) never skips.
        max_skips: at most this many consecutive skips.
        in_window: :func:`tdc_in_window` for this step.
        has_cache: the block holds a cached Δ for these rows.
        cacheable: the policy lets the block cache (``tdc.blocks``).
        rows: the number of batch rows of this call when known; a ``rate`` measured for another number of rows
            does not count (no skip).

    Returns:
        The new accumulated change per row (``accumulated + rate``) if the block is skipped, else None (the block
        runs fully; the caller resets its accumulated change to 0 and its consecutive count to 0).

    Raises:
        ValueError: ``accumulated`` and ``rate`` hold different numbers of rows.
    """
    if not (tolerance > 0 and in_window and cacheable and has_cache and rate and consecutive < max_skips):
        return None
    if rows is not None and len(rate) != rows:
        return None
    acc = list(accumulated) if accumulated else [0.0] * len(rate)
    if len(acc) != len(rate):
        raise ValueError(f"accumulated change has {len(acc)} rows but the change rate has {len(rate)}")
    new_acc = [a + r for a, r in zip(acc, rate)]
    if all(v <= tolerance for v in new_acc):
        return new_acc
    return None


def tdc_skip_rows(
    accumulated: Sequence[float] | None,
    rate: Sequence[float | None] | None,
    consecutive: Sequence[int],
    *,
    tolerance: float,
    max_skips: int,
    in_window: bool,
    has_cache: bool,
    cacheable: bool = True,
) -> list[float | None]:
    """The TDC decision for one block at one step, taken for every batch row on its own (``tdc.cfg_rows =
    "per_row"``): row ``r`` is skipped iff :func:`tdc_skip` holds for that row alone, with its own accumulated
    change, rate and consecutive skips.

    Args:
        accumulated: per row, the change accumulated since the row's last full computation of the block (None or
            empty: 0 for every row).
        rate: per row, the row's last measured per-step change, None for a row without one (None: no row has one).
        consecutive: per row, how many steps in a row the block has been skipped for that row just before this one;
            its length is the number of rows.
        tolerance, max_skips, in_window, has_cache, cacheable: as in :func:`tdc_skip`.

    Returns:
        Per row, the row's new accumulated change if the row is skipped, else None (the row is computed).

    Raises:
        ValueError: ``accumulated`` or ``rate`` holds another number of rows than ``consecutive``.
    """
    n = len(consecutive)
    acc = list(accumulated) if accumulated else [0.0] * n
    rates = list(rate) if rate else [None] * n
    if len(acc) != n or len(rates) != n:
        raise ValueError(f"{n} rows of consecutive skips but {len(acc)} of accumulated change and {len(rates)} of "
                         "change rate")
    out: list[float | None] = []
    for a, r, c in zip(acc, rates, consecutive):
        got = tdc_skip([a], None if r is None else [r], c, tolerance=tolerance, max_skips=max_skips,
                       in_window=in_window, has_cache=has_cache, cacheable=cacheable, rows=1)
        out.append(None if got is None else got[0])
    return out


def tdc_extrapolate(last, prev, since: int, gap: int):
    """The first-order extrapolation of a block's cached Δ (``tdc.extrapolate = 1``), TaylorSeer-style.

    ``last + (last - prev) * (since / gap)``, computed in exactly this order (the factor ``since / gap`` is one
    Python float). The arguments may be numbers or tensors (anything with ``+``, ``-`` and ``*`` by a float).

    Args:
        last: Δ of the block's last full computation (step ``s``).
        prev: Δ of the full computation before it (step ``s_prev``).
        since: ``k = t - s``, the steps from the last full computation to the skipped step ``t`` (>= 1).
        gap: ``s - s_prev``, the distance between the two computations (>= 1).

    Raises:
        ValueError: ``since`` or ``gap`` is below 1.
    """
    if since < 1 or gap < 1:
        raise ValueError(f"tdc_extrapolate needs since >= 1 and gap >= 1, got since={since}, gap={gap}")
    return last + (last - prev) * (since / gap)
