"""Unsubscribes after send: sends followed, within a window, by the subject opting out.

A message that makes people leave is a cost CTR does not show. A send counts once when its
subject records an opt-out event (serving events, `POST /v1/events`) after its `send_at`
and at most `UNSUBSCRIBE_WINDOW` later. The serving event types are the only opt-out
signal with a time: `consent_revoked` today (it stops every personalized channel). Email
unsubscribes and push opt-outs reach the warehouse only as raw `users` flags, which carry
no time, so they cannot be tied to a send (add their event types to OPT_OUT_EVENTS once
serving accepts them).
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd

OPT_OUT_EVENTS = ("consent_revoked",)
UNSUBSCRIBE_WINDOW = timedelta(hours=48)
SEND_COLUMNS = ["send_key", "subject_id", "surface", "region", "model_version", "send_at"]
OPT_OUT_COLUMNS = ["user_id", "ts"]

Partition = tuple[str, str, str]
"""(surface, region, model_version)."""


def sends_of(ledger: pd.DataFrame) -> pd.DataFrame:
    """One row per send (the ledger has one per sent item)."""
    return ledger.drop_duplicates("send_key")[SEND_COLUMNS].reset_index(drop=True)


def opt_outs_of(events: pd.DataFrame) -> pd.DataFrame:
    """The opt-out events among serving events: who, when."""
    return events.loc[events["type"].isin(OPT_OUT_EVENTS), OPT_OUT_COLUMNS].reset_index(drop=True)


def unsubscribes_after_send(
    sends: pd.DataFrame, opt_outs: pd.DataFrame, *, window: timedelta = UNSUBSCRIBE_WINDOW
) -> dict[Partition, int]:
    """Sends whose subject opted out in (send_at, send_at + window], per partition."""
    if sends.empty or opt_outs.empty:
        return {}
    pairs = sends.merge(opt_outs, left_on="subject_id", right_on="user_id")
    send_at = pairs["send_at"].to_numpy(dtype="datetime64[ns]")
    ts = pairs["ts"].to_numpy(dtype="datetime64[ns]")
    within = (ts > send_at) & (ts <= send_at + np.timedelta64(window))
    hit = pairs.loc[within].drop_duplicates("send_key")
    counts = hit.groupby(["surface", "region", "model_version"]).size()
    return {(str(s), str(r), str(m)): int(n) for (s, r, m), n in counts.items()}
