"""Where results live: the resumable zarr run store, its locks, and the status of runs on disk.

run (create and open a run, resume checks), runstore (an open run), layout (its arrays), locks,
ownership (what edtool wrote, deleting it), location, leftovers, integrity, status, urls."""
