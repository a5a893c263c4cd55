"""Usage metering: collectors (provider metrics, local processes), time splitting, the ledger.

`metering.periods` is pure (workflows may use it); `metering.collectors` does HTTP and reads
/proc; `metering.ledger` does the database writes. This package's `__init__` imports nothing, so
importing the pure part never drags I/O along.
"""
