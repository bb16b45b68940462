"""Channels: email, push and digest send plans, the sender, and attribution of opens/clicks.

Plain functions (plans.py, ledger.py, sender.py, attribution.py) hold the rules; the Dagster
shell is assets.py and the `recsys send` command commands.py (docs/CHANNELS.md).
"""
