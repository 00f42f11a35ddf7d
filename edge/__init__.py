"""The edge appliance: watch a scan folder, OCR, package, encrypt, keep an outbox and sync to central."""
