"""The ways poller runs for a long time: the daemon with its HTTP health and metrics."""
