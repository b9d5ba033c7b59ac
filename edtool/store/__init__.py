"""Where results live: the resumable zarr run store, its locks, and the status of runs on disk."""
