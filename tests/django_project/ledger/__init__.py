"""A ledger the tests' tasks write to: a duplicated effect shows as a row."""
