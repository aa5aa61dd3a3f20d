"""MetaSchedule tuning: the per-target database, search spaces, tensor intrinsics, builder worker, progress."""
