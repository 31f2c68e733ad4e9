"""Ingest: the microscope share (listing, "finished", completeness, SMB), the verified copy to
GPFS and the session's folder tree. Ends where a file is verified in the ledger."""
