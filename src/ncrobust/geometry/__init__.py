"""Geometry of features beyond the collapse metrics: the simplex plane, the near-collapse probe, mixup geometry."""
