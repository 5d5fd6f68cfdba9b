"""The coordinator's state layer: every row it keeps, every SQL statement, every state transition.

`State` (db.py) is the one owner of state.db; `records.py` holds the typed records and the state enums it
returns. See docs/operations.md for the state directory.
"""

from .db import COORDINATOR, SCHEMA_VERSION, State, StateError
from .records import (
    GENESIS,
    Activity,
    AssignmentState,
    AuditEntry,
    Client,
    GlobalVersion,
    MetricsKind,
    MetricsReport,
    Next,
    Round,
    RoundPhase,
    Run,
    RunState,
    ServerStateRef,
    Token,
    Update,
    Upload,
    audit_hash,
)

__all__ = [
    "COORDINATOR", "GENESIS", "SCHEMA_VERSION", "Activity", "AssignmentState", "AuditEntry", "Client",
    "GlobalVersion", "MetricsKind", "MetricsReport", "Next", "Round", "RoundPhase", "Run", "RunState",
    "ServerStateRef", "State", "StateError", "Token", "Update", "Upload", "audit_hash",
]
