"""The API side: the Threat Stack client, the request budget, the retry policy.
Nothing here imports the archive side, and the archive side imports nothing of this."""
