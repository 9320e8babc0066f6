"""Where a stage runs: `local` (the judge here, its workers sandboxed on this machine) or `ray` (the
same, on a cluster node). Both take a Job and return a StageResult (plasa_lab.jobs).

Each runner is its own module, and only this one knows both: the Ray runner calls the local one on
its node, so if the local runner lived here too, the import graph would go round in a circle."""

from .local_runner import run_local
from .ray_runner import run_ray  # imports ray only inside its functions: ray stays optional


def get_runner(name: str):
    """The runner function for a name: `local` or `ray`."""
    if name == "local":
        return run_local
    if name == "ray":
        return run_ray
    raise ValueError(f"unknown runner {name!r}: choose local or ray")
