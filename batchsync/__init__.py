"""batchsync: keep a CRM's newsletter subscriptions in step with an email provider over batch files on (S)FTP.

The library's front door is :class:`batchsync.sync.Sync`; ``batchsync.cli`` is the command line over it.
"""

__version__ = "0.2.0"
