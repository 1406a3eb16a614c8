"""The floor both sides stand on (imports neither torch nor Ray): Arrow schemas of every dataset (``datasets``), the
columns in flight between stages (``batches``), encodings (``encodings``), the error family (``errors``) and all
storage access: URIs, filesystems, atomic writes and the one redaction rule (``storage``)."""
