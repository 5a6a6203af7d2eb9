"""Code shared by the coordinator and the workers: schemas, settings, mapping, images, models."""
