"""The trace store: ``trace_store.TraceStore`` (SQLite + content-addressed blobs, crash-safe appends) and
``parquet`` (a store's traces exported as Parquet shards)."""
