"""The operations logs: the admin log (key events and every warning, always on), the session
log (one line per transaction, off by default), their rotated JSON-lines files and journald."""
