"""The edge appliance: watch a scan folder, OCR, package, seal and send documents to central."""
