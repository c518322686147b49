"""Accounting: signed bandwidth receipts, the ledger, epochs and rewards."""
