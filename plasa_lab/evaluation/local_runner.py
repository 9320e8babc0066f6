"""The `local` runner: the judge here, its workers sandboxed on this machine. A Ray node runs the
same (plasa_lab.evaluation.ray_runner); plasa_lab.evaluation.stage.RUNNERS picks one by name."""

from ..data import corpora
from ..data.tokens import CorpusError, load_corpus
from .jobs import Job, StageResult


def local_corpus(name: str, fingerprint: str):
    """This machine's cache of the corpus, verified against the run's fingerprint; built here
    first if missing (a fresh cluster node builds its own)."""
    try:
        return load_corpus(corpora.corpus_dir(name), fingerprint)
    except CorpusError:
        corpus = corpora.prepare_corpus(name, log=lambda *_: None)
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
