"""The publisher SDK: `connect` (an embedded publisher), `Client.submit`, `Job.results`,
`Job.wait`, `Job.export`, and `run_job` for synchronous scripts. See client.py."""

from .client import Client, Job, JobReport, SdkError, ShardResult, connect, run_job
from .inputs import InputError, load_inputs, load_model

__all__ = ["connect", "run_job", "Client", "Job", "JobReport", "ShardResult", "SdkError",
           "InputError", "load_inputs", "load_model"]
