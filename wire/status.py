"""Status details both sides read: what a non-OK answer carries besides its code and message."""

# An ABORTED offset mismatch carries the session's current offset in this trailing metadata key, so a client
# can tell "my earlier attempt was applied" from "someone else wrote".
CURRENT_OFFSET_KEY = "kvshard-current-offset"
