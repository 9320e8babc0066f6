"""Where a stage runs: `local` (the judge here, its workers sandboxed on this machine) or `ray` (the
same, on a cluster node). Both take a Job and return a StageResult (plasa_lab.jobs)."""

from . import data
from .jobs import Job, StageResult
from .tokens import CorpusError, load_corpus


def local_corpus(name: str, fingerprint: str):
    """This machine's cache of the corpus, verified against the run's fingerprint; built here
    first if missing (a fresh cluster node builds its own)."""
    try:
        return load_corpus(data.corpus_dir(name), fingerprint)
    except CorpusError:
        corpus = data.prepare_corpus(name, log=lambda *_: None)
        if corpus.fingerprint != fingerprint:
            raise CorpusError(
                f"the token cache here has fingerprint {corpus.fingerprint[:12]}, the run "
                f"{fingerprint[:12]}: same corpus, different tokens (tokenizer or source version)"
            )
        return corpus


def run_local(job: Job, on_line=None) -> StageResult:
    """Judge one stage of one program on this machine."""
    from .judge import run_stage

    try:
        corpus = local_corpus(job.corpus, job.fingerprint)
    except (CorpusError, ValueError) as e:
        return StageResult.infrastructure_failure(f"corpus: {e}")
    return run_stage(job, corpus, on_line)


def get_runner(name: str):
    """The runner function for a name: `local` or `ray`."""
    if name == "local":
        return run_local
    if name == "ray":
        from .ray_runner import run_ray

        return run_ray
    raise ValueError(f"unknown runner {name!r}: choose local or ray")
