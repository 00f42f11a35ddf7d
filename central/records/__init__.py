"""The archive's records beyond ingest (issue 9): the archival PDF/A copy and its jobs,
operators' metadata corrections, and the metadata export."""
