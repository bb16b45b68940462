"""Pandera contracts for source and intermediate tables, with readable violations."""

from recsys_assets.contracts.errors import ContractViolation, Violation
from recsys_assets.contracts.raw import RAW_CONTRACTS, check_foreign_keys, validate_table

__all__ = [
    "RAW_CONTRACTS",
    "ContractViolation",
    "Violation",
    "check_foreign_keys",
    "validate_table",
]
