"""The coordinator's state layer: every row it keeps, every SQL statement, every state transition.

`State` (db.py) is the one owner of state.db; `records.py` holds the typed records and the state enums it
returns. See docs/operations.md for the state directory.
"""

from . import records
from .db import COORDINATOR, SCHEMA_VERSION, State, StateError, TransitionRefused
from .records import *  # noqa: F403 - the package is the one place the records are imported from

__all__ = ["COORDINATOR", "SCHEMA_VERSION", "State", "StateError", "TransitionRefused", *records.__all__]
