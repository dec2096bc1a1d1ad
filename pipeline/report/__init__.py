"""pipeline.report: I/O; evidence to GeoJSON, rasters and manifest."""
