"""Arrow schemas and encodings shared by every dataset clipmaps reads or writes (imports neither torch nor Ray)."""
