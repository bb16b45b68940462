"""Unsubscribes after send: sends followed, within a window, by the subject opting out.

A message that makes people leave is a cost CTR does not show. A send counts once when its
subject records an opt-out event (serving events, `POST /v1/events`) that stops its medium
after its `send_at` and at most `UNSUBSCRIBE_WINDOW` later: `consent_revoked` stops every
channel, `email_unsubscribed` email and digests, `push_disabled` push. The send is counted
under its first such opt-out, so the counts by opt-out type add up to the sends followed by
one. Raw `users` flags carry no time and cannot be tied to a send; the events can.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd

from recsys_assets.rules.person import CONSENT, EMAIL, PERSON_FLAG_EVENTS, PUSH

MEDIA_STOPPED = {CONSENT: ("email", "push"), EMAIL: ("email",), PUSH: ("push",)}
"""Person flag → the media (`medium` of a send) that flag turned off stops."""
OPT_OUT_EVENTS: dict[str, tuple[str, ...]] = {
    kind: MEDIA_STOPPED[flag] for kind, (flag, value) in PERSON_FLAG_EVENTS.items() if not value
}
"""Opt-out event type → the media of the sends it can follow."""
UNSUBSCRIBE_WINDOW = timedelta(hours=48)
SEND_COLUMNS = [
    "send_key", "subject_id", "surface", "medium", "region", "model_version", "send_at",
]  # fmt: skip
OPT_OUT_COLUMNS = ["user_id", "type", "ts"]

Unsubscribes = tuple[str, str, str, str]
"""(surface, region, model_version, opt-out event type)."""


def sends_of(ledger: pd.DataFrame) -> pd.DataFrame:
    """One row per send (the ledger has one per sent item)."""
    return ledger.drop_duplicates("send_key")[SEND_COLUMNS].reset_index(drop=True)


def opt_outs_of(events: pd.DataFrame) -> pd.DataFrame:
    """The opt-out events among serving events: who, which, when."""
    chosen = events["type"].isin(list(OPT_OUT_EVENTS))
    return events.loc[chosen, OPT_OUT_COLUMNS].reset_index(drop=True)


def unsubscribes_after_send(
    sends: pd.DataFrame, opt_outs: pd.DataFrame, *, window: timedelta = UNSUBSCRIBE_WINDOW
) -> dict[Unsubscribes, int]:
    """Sends whose subject opted out of their medium in (send_at, send_at + window], per
    partition and the type of the first such opt-out."""
    if sends.empty or opt_outs.empty:
        return {}
    stops = pd.DataFrame(
        [(kind, medium) for kind, media in OPT_OUT_EVENTS.items() for medium in media],
        columns=["type", "medium"],
    )
    pairs = sends.merge(opt_outs, left_on="subject_id", right_on="user_id").merge(stops)
    send_at = pairs["send_at"].to_numpy(dtype="datetime64[ns]")
    ts = pairs["ts"].to_numpy(dtype="datetime64[ns]")
    within = (ts > send_at) & (ts <= send_at + np.timedelta64(window))
    first = pairs.loc[within].sort_values("ts", kind="stable").drop_duplicates("send_key")
    counts = first.groupby(["surface", "region", "model_version", "type"]).size()
    return {(str(s), str(r), str(m), str(t)): int(n) for (s, r, m, t), n in counts.items()}
