"""The bucket side: object stores with conditional writes, the record layout, create-only
archive writes, the checkpoint and the lease. Nothing here imports the API side."""
