"""The rank loop: the job queue and replicas (`engine`, `replicas`), one request on one rank
(`worker`, `generate`), the request itself, and offline runs without HTTP (`offline`)."""
