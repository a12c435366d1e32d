"""The publisher SDK: `connect` (an embedded publisher), `Client.submit`, `Job.results`,
`Job.wait`, `Job.export`, `run_job` for synchronous scripts, and `attach` to a publisher
already running on this machine (`p2pfleet job serve`). See client.py."""

from .client import (AttachedClient, Client, Job, JobReport, SdkError, ShardResult, attach,
                     connect, run_job)
from .inputs import InputError, load_inputs, load_model

__all__ = ["connect", "attach", "AttachedClient", "run_job", "Client", "Job", "JobReport", "ShardResult", "SdkError",
           "InputError", "load_inputs", "load_model"]
