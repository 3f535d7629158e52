"""The commands that choose where a job runs (one process or a device mesh): above training and distributed."""
