"""poller: keeps an S3 archive of Threat Stack alerts complete by polling the v2 API."""

__version__ = "0.1.0"
