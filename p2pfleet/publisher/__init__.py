"""The publisher side of the network: jobs in, verified outputs out (engine.py on a Mesh)."""

from .engine import JobStatus, Publisher, PublisherError, PublisherSettings
from .jobs import JobSpec, JobSpecError

__all__ = ["Publisher", "PublisherSettings", "PublisherError", "JobStatus", "JobSpec", "JobSpecError"]
