"""monitoring: the inference log store, data quality, skew/drift/outlier detection and reports."""
