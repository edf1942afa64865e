"""Worker pools: processes that run batches on one kind of hardware."""
