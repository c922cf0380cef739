"""The coordinator's operations: credentials and start-up kits, the SuperLink and nginx under supervision, site keys, rehearsal."""
