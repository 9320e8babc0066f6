"""An evolution run: OpenEvolve configured for PLASA, launched or resumed, watched, summarised.

OpenEvolve does the search; this module adds what an overnight run needs around it: a checked
config, an LLM (API, local server, or the offline mutator), a reachable endpoint before the start,
OS isolation checked before anything runs, the initial program evaluated first on every seed of
the run (the noise floor, and the time limits calibrated on this machine, now), run.json, live
progress with an ETA, resume to a total that says what it resumes from, a trace that agrees with
the checkpoint after any kill, a checkpoint and the resume command on any stop, a summary of the
best confirmed program and of where the night's time went, and a non-zero exit when no child
could be evaluated (OpenEvolve exits 0 then).
"""

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from . import INITIAL_PROGRAM, PROJECT_ROOT, rundir
from .checks import integrity_violation
from .constants import HARNESS_VERSION, get_profile
from .evaluation import Calibration, calibration, confirmation_count, corpus_of, evaluate_stage, noise_aware_stage2
from .ledger import Ledger, LedgerError
from .mutator import NAME as OFFLINE_MODEL_NAME
from .rundir import OUTPUT_ROOT, TRACE, TRACE_FAILURES, TRACE_LOST, latest_checkpoint, newest_run, read_jsonl
from .sandbox import UNISOLATED_WARNING, SandboxUnavailable, require_isolation
from .settings import Settings
from .util import atomic_write, first_line, message_line

EVALUATOR = PROJECT_ROOT / "evaluator.py"


class RunError(Exception):
    """Why a run cannot start or did not produce anything; one line."""


# ---------------------------------------------------------------------------------------------
# Config


def unknown_config_keys(raw: dict) -> list[str]:
    """Dotted paths of keys in a config dict that OpenEvolve's dataclasses do not define."""
    from openevolve.config import (
        Config,
        DatabaseConfig,
        EvaluatorConfig,
        EvolutionTraceConfig,
        LLMConfig,
        LLMModelConfig,
        PromptConfig,
    )

    sections = dict(
        llm=LLMConfig,
        prompt=PromptConfig,
        database=DatabaseConfig,
        evaluator=EvaluatorConfig,
        evolution_trace=EvolutionTraceConfig,
    )

    def check(d, cls, prefix):
        names = {f.name for f in dataclasses.fields(cls)}
        bad = [f"{prefix}{k}" for k in d if k not in names]
        for k, v in d.items():
            if k in sections and cls is Config and isinstance(v, dict):
                bad += check(v, sections[k], f"{k}.")
            elif k in ("models", "evaluator_models") and cls is LLMConfig and isinstance(v, list):
                for i, m in enumerate(v):
                    bad += check(m or {}, LLMModelConfig, f"{prefix}{k}[{i}].")
        return bad

    return check(raw, Config, "")


def load_config(path: Path):
    """OpenEvolve's Config from YAML, refusing keys it would silently ignore."""
    from openevolve.config import Config

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise RunError(f"cannot read the config {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise RunError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or message_line(e)
        raise RunError(f"{path} is not valid YAML{where}: {problem}")
    if not isinstance(raw, dict):
        raise RunError(f"{path} must hold a YAML mapping")
    bad = unknown_config_keys(raw)
    if bad:
        raise RunError(f"{path}: unknown OpenEvolve keys (it would ignore them silently): {', '.join(bad)}")
    try:
        return Config.from_yaml(path), raw
    except Exception as e:  # dacite type errors and OpenEvolve's own validation
        raise RunError(f"{path}: {first_line(e)}")


# ---------------------------------------------------------------------------------------------
# LLM

LOCAL_TIMEOUT = 900.0  # seconds: a CPU server reads a 3,000-token prompt in ~3 min and writes ~5 tokens/s
IDENTICAL_FAILURES_TO_STOP = 3  # LLM failures in a row with the same reason end the run


@dataclass
class LLMChoice:
    mode: str  # api | local | offline
    api_base: str | None
    models: list[str]
    note: str
    compact: bool = False  # compact prompts (plasa_lab.llm): default for local servers
    timeout: float | None = None


def choose_llm(
    mode: str | None, api_base: str | None, model: str | None, config, prompt: str | None = None
) -> LLMChoice:
    env_key, env_base = os.environ.get("OPENAI_API_KEY"), os.environ.get("OPENAI_API_BASE")
    if mode is None:
        mode = "api" if env_key else "offline"
        if mode == "offline":
            print(
                "No OPENAI_API_KEY set: using the offline mutator (a seeded LLM-free search operator; "
                "pass --llm api or --llm local to use a model).",
                file=sys.stderr,
            )
    if mode == "offline":
        return LLMChoice(
            "offline",
            None,
            [OFFLINE_MODEL_NAME],
            "offline mutator: seeded LLM-free edits inside the EVOLVE-BLOCKs (the no-LLM baseline)",
        )
    base = api_base or env_base or (config.llm.api_base if mode == "api" else None)
    if not base:
        raise RunError("--llm local needs --api-base URL (or OPENAI_API_BASE), e.g. http://127.0.0.1:8000/v1")
    if mode == "api" and not env_key:
        raise RunError("--llm api needs OPENAI_API_KEY in the environment (or use --llm offline)")
    models = [model] if model else [m.name for m in config.llm.models]
    compact = (prompt or ("compact" if mode == "local" else "full")) == "compact"
    timeout = LOCAL_TIMEOUT if mode == "local" else float(config.llm.timeout or 180)
    return LLMChoice(
        mode,
        base,
        models,
        f"{mode} LLM at {base} ({'compact' if compact else 'full'} prompts, {timeout:.0f} s per call)",
        compact,
        timeout,
    )


def first_prompt(config, compact: bool) -> dict:
    """The run's first prompt, as OpenEvolve builds it for the initial program (metrics as a placeholder)."""
    from openevolve.prompt.sampler import PromptSampler

    from .llm import compact_prompt

    code = INITIAL_PROGRAM.read_text()
    metrics = {
        "combined_score": 0.0018,
        "val_ppl": 556.4,
        "val_loss": 6.32,
        "density": 0.655,
        "indexer_params": 83968.0,
    }
    program = dict(id="initial", code=code, metrics=metrics)
    prompt = PromptSampler(config.prompt).build_prompt(
        current_program=code,
        parent_program=code,
        program_metrics=metrics,
        previous_programs=[program],
        top_programs=[program] * (config.prompt.num_top_programs + config.prompt.num_diverse_programs),
        inspirations=[],
        language="python",
        evolution_round=1,
        diff_based_evolution=True,
        feature_dimensions=config.database.feature_dimensions,
    )
    return dict(prompt, user=compact_prompt(prompt["user"])) if compact else prompt


def check_endpoint(choice: LLMChoice, config, say=None, timeout: float = 10.0):
    """Fail fast, before any training: the server must answer, accept the key, and complete a prompt
    as long as the run's first one (a local server's context may be too small; a broken build may
    crash on its first completion). One line on any failure."""
    import openai

    from .llm import describe_failure

    api_base = choice.api_base
    client = openai.OpenAI(
        base_url=api_base, api_key=os.environ.get("OPENAI_API_KEY") or "none", timeout=timeout, max_retries=0
    )
    try:
        client.models.list()
    except openai.AuthenticationError:
        raise RunError(f"the LLM endpoint {api_base} rejected the API key (401): check OPENAI_API_KEY")
    except openai.APIConnectionError as e:
        cause = e.__cause__ or e
        raise RunError(f"cannot reach the LLM endpoint {api_base}: {type(cause).__name__}: {cause}")
    except openai.APIStatusError:
        pass  # it answered; some OpenAI-compatible servers have no /models
    prompt = first_prompt(config, choice.compact)
    if choice.mode == "api":  # a paid API: a short request proves the model name and the key
        prompt = dict(system="Answer with one word.", user="Ready?")
    size = len(prompt["system"]) + len(prompt["user"])
    if say:
        say(
            f"checking the LLM: one completion of a {size:,}-character prompt like the run's first "
            f"(a CPU server takes minutes to read it; limit {choice.timeout:.0f} s)"
        )
    start = time.monotonic()
    try:
        client.with_options(timeout=choice.timeout).chat.completions.create(
            model=choice.models[0],
            max_tokens=1,
            messages=[{"role": "system", "content": prompt["system"]}, {"role": "user", "content": prompt["user"]}],
        )
    except Exception as e:
        raise RunError(
            f"the LLM at {api_base} cannot complete a prompt like the run's ({size:,} characters): "
            f"{describe_failure(e, choice.timeout)}"
        ) from None
    if say:
        say(f"the LLM answered in {time.monotonic() - start:.0f} s")


def configure_llm(config, choice: LLMChoice, run_dir: Path):
    from .llm import client_factory
    from .mutator import offline_client

    if choice.mode == "offline":
        config.llm.models = config.llm.models[:1]
        config.llm.models[0].name = OFFLINE_MODEL_NAME
        config.llm.models[0].init_client = offline_client
    else:
        template = config.llm.models[0]
        config.llm.models = [
            dataclasses.replace(
                template, name=name, api_base=choice.api_base, weight=1.0, timeout=choice.timeout, retries=0
            )
            for name in choice.models
        ]
        for m in config.llm.models:
            if choice.mode == "local":
                m.api_key = os.environ.get("OPENAI_API_KEY") or "local"  # llama.cpp and friends ignore it
            m.init_client = client_factory(run_dir, choice.compact)  # one attempt per call, every call recorded
    config.llm.evaluator_models = list(config.llm.models)


# ---------------------------------------------------------------------------------------------
# Run folder


def _versions():
    import openevolve
    import torch

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        openevolve=openevolve.__version__,
        project_commit=commit,
        harness_version=HARNESS_VERSION,
    )


def write_run_json(run_dir: Path, record: dict):
    try:
        atomic_write(run_dir / rundir.RUN_RECORD, json.dumps(record, indent=2))
    except OSError as e:
        raise RunError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None


def fixed_code_drift(checkpoint: Path) -> str | None:
    """The first way a checkpoint's programs differ from initial_program.py outside the EVOLVE-BLOCKs
    (the project changed under a run: its children would all fail the outside-the-blocks check), or None."""
    reference = INITIAL_PROGRAM.read_text()
    for path in sorted((checkpoint / "programs").glob("*.json")):
        try:
            code = json.loads(path.read_text()).get("code")
        except (OSError, ValueError):
            continue  # an unreadable program is OpenEvolve's to report
        if isinstance(code, str) and (problem := integrity_violation(code, reference)):
            return problem
    return None


def discard_unsaved_iterations(run_dir: Path, done: int) -> int:
    """Move the trace records (children, failures, LLM responses) of iterations after the checkpoint
    we resume from into evolution_trace_lost.jsonl: a kill before or during a checkpoint's save
    leaves them without a population entry, and the resumed run runs those iterations again (an
    evaluation it repeats is answered by the ledger). Returns how many records moved."""
    moved = []
    for name in (TRACE, TRACE_FAILURES, rundir.LLM_RESPONSES):
        path = run_dir / name
        records = read_jsonl(path)
        keep = [r for r in records if int(r.get("iteration") or 0) <= done]
        if len(keep) != len(records):
            moved += [dict(r, lost_from=name) for r in records if int(r.get("iteration") or 0) > done]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))
    if moved:
        with open(run_dir / TRACE_LOST, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in moved)
    return len(moved)


# ---------------------------------------------------------------------------------------------
# The initial program: the noise floor and the time limits


@dataclass
class NoiseFloor:
    seeds: list[int]
    val_losses: list[float]  # the initial program's, per seed
    sd: float | None  # of val_loss over the seeds: the run's noise

    def record(self) -> dict:
        return dict(
            seeds=self.seeds,
            val_losses=self.val_losses,
            val_loss_sd=self.sd,
            val_ppl_per_seed=[round(math.exp(v), 2) for v in self.val_losses],
        )


def evaluate_initial_program(settings: Settings, say) -> tuple[NoiseFloor, dict]:
    """Stage 1, then stage 2 on every seed of the run (ledger first): a broken set-up fails now with
    its reason, the seeds give the run its noise floor, and the timings calibrate every time limit."""
    code = INITIAL_PROGRAM.read_text()
    progress = lambda line: say(f"  {line}")
    say(
        f"evaluating the initial program: stage 1, then stage 2 on seed{'s' * (len(settings.seeds) > 1)} "
        f"{', '.join(map(str, settings.seeds))} (the noise floor)"
    )
    first = evaluate_stage(code, 1, settings, progress)
    if not first.passed:
        raise RunError(f"the initial program fails its own evaluation: {first.artifacts.get('failure')}")
    losses = []
    for seed in settings.seeds:
        evaluation = evaluate_stage(code, 2, settings, progress, seed=seed)
        if not evaluation.passed:
            raise RunError(
                f"the initial program fails its own evaluation (seed {seed}): {evaluation.artifacts.get('failure')}"
            )
        m = evaluation.metrics
        losses.append(m["val_loss"])
        say(
            f"initial program, seed {seed}: val_ppl {m['val_ppl']:.1f}, val_acc {m['val_acc']:.3f} "
            f"({'from the ledger' if evaluation.from_ledger else f'{evaluation.seconds:.0f} s'})"
        )
    floor = NoiseFloor(list(settings.seeds), losses, statistics.stdev(losses) if len(losses) > 1 else None)
    # What OpenEvolve will file for it (the evaluator answers from the ledger): the run's first best.
    return floor, noise_aware_stage2(code, settings).metrics


def expected_seconds_per_child(cal: Calibration, settings: Settings) -> float | None:
    """One child: stage 1 and stage 2 as the initial program needs them here (contenders add a stage 2
    per extra seed; that share is measured as the run goes)."""
    if cal.stage1_seconds is None or cal.stage2_seconds is None:
        return None
    return (cal.stage1_seconds + cal.stage2_seconds) / settings.parallel


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


# ---------------------------------------------------------------------------------------------
# Progress


def child_ppl(metrics: dict | None):
    """A child's val_ppl if it passed evaluation, else None."""
    metrics = metrics or {}
    return metrics.get("val_ppl") if (metrics.get("combined_score") or 0.0) > 0 else None


class Best:
    """The best program as OpenEvolve keeps it: the highest combined_score, the earlier on a tie. With
    noise-aware scores only a program confirmed on every seed can hold it (see evaluation.noise_aware_stage2)."""

    def __init__(self, metrics: dict | None, initial_losses: list[float]):
        self.metrics, self.initial_losses = metrics or {}, initial_losses

    def offer(self, metrics: dict):
        if (metrics.get("combined_score") or 0) > (self.metrics.get("combined_score") or 0):
            self.metrics = metrics

    def describe(self) -> str:
        m = self.metrics
        if not child_ppl(m):
            return "no passing program yet"
        seeds = sorted(int(k.removeprefix("val_loss_seed")) for k in m if k.startswith("val_loss_seed"))
        if len(seeds) < 2 or len(self.initial_losses) < 2:
            return f"best val_ppl {m['val_ppl']:.1f}"
        from .replay import verdict

        losses = [m[f"val_loss_seed{s}"] for s in seeds]
        word, p = verdict(losses, self.initial_losses)
        change = 100 * math.expm1(
            statistics.fmean(losses) - statistics.fmean(self.initial_losses)
        )  # of the geometric mean ppl
        p_text = f"p={p:.2g}" if p is not None else "p n/a"
        return (
            f"best confirmed val_ppl {m['val_ppl']:.1f} ({len(seeds)} seeds, {change:+.2f}% vs initial, "
            f"{p_text}: {word})"
        )


class Progress(threading.Thread):
    """Tails the evolution trace: one line per finished iteration, a live bar with an ETA, each LLM
    response filed with its outcome (llm_responses.jsonl), and a stop when the LLM keeps failing
    the same way (every further iteration would only burn its time)."""

    def __init__(self, run_dir: Path, first: int, last: int, best: Best, seconds_per_child: float | None, model: str):
        super().__init__(daemon=True)
        from rich.console import Console

        self.run_dir, self.first, self.last, self.best, self.model = run_dir, first, last, best, model
        self.estimate = seconds_per_child
        self.console = Console(stderr=True)
        self.seen, self.stop_event, self.started = set(), threading.Event(), time.monotonic()
        self.since, self.used_calls = time.time(), set()
        self.streak, self.stop_reason = (None, 0), None

    def eta(self) -> str:
        remaining = self.last - self.first + 1 - len(self.seen)
        per_child = (time.monotonic() - self.started) / len(self.seen) if self.seen else self.estimate
        return f"ETA {hours(per_child * remaining)}" if per_child and remaining else ("ETA ?" if remaining else "")

    def run(self):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        with Bar(
            TextColumn("[bold]evolve"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=True,
        ) as bar:
            task = bar.add_task("", total=self.last - self.first + 1, eta=self.eta(), status=self.best.describe())
            while not self.stop_event.wait(1.0):
                self.poll(lambda line: bar.console.print(line, highlight=False))
                bar.update(task, completed=len(self.seen), eta=self.eta(), status=self.best.describe())
            self.poll(lambda line: bar.console.print(line, highlight=False))

    def poll(self, emit):
        # The trace in its own order, the order OpenEvolve filed the children in (with parallel
        # evaluations, not the iterations' order): on a tie the earlier filed stays best, as in OpenEvolve.
        events = [(r["iteration"], r, False) for r in read_jsonl(self.run_dir / TRACE)]
        events += [(r["iteration"], r, True) for r in read_jsonl(self.run_dir / TRACE_FAILURES)]
        calls = None
        for iteration, record, failed in events:
            if iteration in self.seen or not self.first <= iteration <= self.last:
                continue
            self.seen.add(iteration)
            metrics, artifacts = record.get("child_metrics") or {}, record.get("artifacts") or {}
            ppl = None if failed else child_ppl(metrics)
            if ppl is not None:
                self.best.offer(metrics)
                seeds = int(metrics.get("seeds") or 1)
                confirmed = ", confirmed" if metrics.get("confirmed") else ""
                outcome = f"val_ppl {ppl:.1f} ({seeds} seed{'s' * (seeds > 1)}{confirmed})"
            elif not failed:
                outcome = f"rejected: {str(artifacts.get('failure', 'score 0'))[:110]}"
            else:
                outcome = f"no child: {str(record.get('error'))[:110]}"
            emit(f"iteration {iteration}/{self.last}: {outcome} | {self.best.describe()} | {self.eta()}")
            calls = read_jsonl(self.run_dir / rundir.LLM_CALLS) if calls is None else calls
            self.file_response(iteration, record, failed, calls)
            self.watch_failures(record.get("error") if failed else None)

    def file_response(self, iteration: int, record: dict, failed: bool, calls: list[dict]):
        """One llm_responses.jsonl line: the trace's outcome joined with the client's call record (by
        response text, or by error) for the model, prompt size and seconds."""
        from .llm import outcome_of

        response, error = record.get("llm_response"), record.get("error") if failed else None
        call = next(
            (
                i
                for i, c in enumerate(calls)
                if i not in self.used_calls
                and c.get("time", 0) >= self.since
                and (
                    (response is not None and c.get("response") == response)
                    or (c.get("error") and error and c["error"] in error)
                )
            ),
            None,
        )
        if call is not None:
            self.used_calls.add(call)
        c = calls[call] if call is not None else {}
        line = dict(
            iteration=iteration,
            model=c.get("model", self.model),
            prompt_chars=c.get("prompt_chars"),
            prompt_tokens=c.get("prompt_tokens"),
            seconds=c.get("seconds"),
            outcome=outcome_of(record.get("child_metrics"), error),
            error=error or (record.get("artifacts") or {}).get("failure"),
            response=response,
        )
        with open(self.run_dir / rundir.LLM_RESPONSES, "a") as f:
            f.write(json.dumps(line) + "\n")

    def watch_failures(self, error: str | None):
        """IDENTICAL_FAILURES_TO_STOP LLM failures in a row, for the same reason: stop the run (as Ctrl-C
        does, with a checkpoint), and say why."""
        if not (error and error.startswith("LLM generation failed")):
            self.streak = (None, 0)
            return
        same, count = self.streak
        self.streak = (error, count + 1 if error == same else 1)
        if self.streak[1] >= IDENTICAL_FAILURES_TO_STOP and not self.stop_reason:
            self.stop_reason = f"{self.streak[1]} LLM failures in a row: {error[:200]}"
            if not self.stop_event.is_set():  # OpenEvolve still running: stop it as Ctrl-C would
                os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class RunOptions:
    iterations: int | None = None
    profile: str | None = None
    output: Path | None = None
    resume: bool = False
    target_ppl: float | None = None
    llm: str | None = None
    api_base: str | None = None
    model: str | None = None
    config: Path = PROJECT_ROOT / "config.yaml"
    device: str | None = None
    corpus: str | None = None
    runner: str | None = None
    seeds: str | None = None
    prompt: str | None = None  # compact | full (default: compact for --llm local)


class Stopped(BaseException):
    """Ctrl-C or SIGTERM while the run itself (not OpenEvolve) was working. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way (the judge's) takes it for an error."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise Stopped here, so any stop ends with a checkpoint (where there is one)
    and the resume command, never a traceback or a silent exit."""

    def handler(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def second_stops_ignored():
    """While a stop is carried out (its checkpoint written, its line printed), another Ctrl-C or
    SIGTERM changes nothing: it would only cut the checkpoint short."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


STOPPED_EXIT = 130  # any stop (Ctrl-C or SIGTERM): what a shell reports for Ctrl-C


def resume_line(run_dir: Path) -> str:
    return f"Resume with: python scripts/evolve.py --resume --output {run_dir}"


def _run_dir(options: RunOptions):
    if options.resume:
        run_dir = options.output or newest_run()
        if run_dir is None or not (Path(run_dir) / rundir.RUN_RECORD).exists():
            raise RunError(f"nothing to resume: {run_dir or OUTPUT_ROOT} holds no run (run.json missing)")
        return Path(run_dir)
    if options.output:
        run_dir = Path(options.output)
        if (run_dir / rundir.RUN_RECORD).exists():
            raise RunError(f"{run_dir} already holds a run: add --resume to continue it, or choose another --output")
        return run_dir
    return OUTPUT_ROOT / datetime.now().strftime("run-%Y%m%d-%H%M%S")


def _settings(options: RunOptions, previous: dict | None, run_dir: Path) -> Settings:
    """The run's settings, resolved once: a resume keeps the profile, corpus, seeds and ledger it started with."""
    before = (previous or {}).get("settings") or {}
    profile = options.profile or before.get("profile") or (previous or {}).get("profile", {}).get("name")
    if before and profile != before.get("profile"):
        raise RunError(
            f"this run uses the {before.get('profile')} profile; resuming it with {profile} would mix "
            f"incomparable scores"
        )
    seeds = options.seeds or before.get("seeds")
    if before and options.seeds and [int(s) for s in options.seeds.split(",")] != before.get("seeds"):
        raise RunError(f"this run confirms on seeds {before.get('seeds')}; resuming it with others would mix scores")
    try:
        settings = Settings(
            profile=profile,
            corpus=options.corpus or before.get("corpus"),
            device=options.device or before.get("device"),
            runner=options.runner or before.get("runner"),
            seeds=seeds,
            ledger=before.get("ledger") or None,  # None: Settings reads $PLASA_LEDGER
        )
    except ValueError as e:
        raise RunError(str(e)) from None
    settings.ledger = settings.ledger or str(run_dir / rundir.LEDGER)  # neither: the run's own
    settings.noise_aware = len(settings.seeds) > 1
    return settings


def run(options: RunOptions) -> int:
    """Launch or resume a run; returns the process exit code. A stop (Ctrl-C, SIGTERM) at any moment
    ends with one line saying how to go on: the resume command once run.json exists, else the same
    command again."""
    where = {}  # the run folder once known, and the iteration a resume would start from
    try:
        with stop_on_signals():
            return _run(options, where)
    except Stopped as e:
        run_dir = where.get("run_dir")
        if run_dir is not None and (run_dir / rundir.RUN_RECORD).exists():
            print(
                f"stopped ({e}) before iteration {where.get('done', 0) + 1}; nothing finished is lost "
                f"(finished evaluations are in the ledger). {resume_line(run_dir)}",
                file=sys.stderr,
            )
        else:
            print(
                f"stopped ({e}) before the run started; nothing was written. Start it again with: "
                f"python {' '.join(sys.argv)}",
                file=sys.stderr,
            )
        return STOPPED_EXIT


def _run(options: RunOptions, where: dict) -> int:
    config, raw_config = load_config(options.config)
    run_dir = _run_dir(options)
    where["run_dir"] = run_dir
    try:
        previous = rundir.read_run_record(run_dir) if options.resume else None
    except rundir.RunDirError as e:
        raise RunError(str(e)) from None
    settings = _settings(options, previous, run_dir)
    profile = get_profile(settings.profile)
    total = (
        options.iterations
        if options.iterations is not None
        else ((previous or {}).get("iterations_total") or config.max_iterations)
    )
    if total < 1:
        raise RunError(f"--iterations must be at least 1, got {total}")
    if options.target_ppl is not None and options.target_ppl <= 0:
        raise RunError(f"--target-ppl must be positive, got {options.target_ppl}")

    same_llm = previous and options.llm in (None, previous["llm"]["mode"])
    choice = choose_llm(
        options.llm or (previous["llm"]["mode"] if previous else None),
        options.api_base or (previous["llm"]["api_base"] if same_llm else None),
        options.model,
        config,
        options.prompt or ((previous or {}).get("llm", {}).get("prompt") if same_llm else None),
    )
    if choice.mode != "offline":
        check_endpoint(choice, config, say=lambda line: print(line, file=sys.stderr, flush=True))
    configure_llm(config, choice, run_dir)

    checkpoint = latest_checkpoint(run_dir) if options.resume else None
    done = where["done"] = checkpoint[1] if checkpoint else 0
    if done >= total:
        print(f"{run_dir}: already at iteration {done} of {total}; nothing to do (raise --iterations to go on).")
        return 0
    try:
        require_isolation(settings.sandbox)
    except SandboxUnavailable as e:
        raise RunError(f"cannot isolate the children: {e}") from None
    if settings.sandbox != "bwrap":
        print(f"WARNING: {UNISOLATED_WARNING}", file=sys.stderr)

    corpus = corpus_of(settings.corpus)
    if previous and previous["corpus"]["fingerprint"] != corpus.fingerprint:
        raise RunError(
            f"the token cache changed since this run started (fingerprint {corpus.fingerprint[:12]}, "
            f"run {previous['corpus']['fingerprint'][:12]}): its scores would not compare"
        )
    if checkpoint and (problem := fixed_code_drift(checkpoint[0])):
        commit = ((previous or {}).get("versions") or {}).get("project_commit") or "?"
        raise RunError(
            f"this run's programs were made from another initial_program.py ({problem}): every child would "
            f"fail; resume it at the commit it started from ({commit[:12]}) or start a new run"
        )
    settings.corpus = corpus.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        Ledger(settings.ledger)
    except OSError as e:
        raise RunError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None
    except LedgerError as e:
        raise RunError(str(e)) from None
    if settings.runner == "ray":
        from .ray_runner import parallel_evaluations

        try:
            config.evaluator.parallel_evaluations = parallel_evaluations(settings.threads)
        except (ConnectionError, OSError, subprocess.SubprocessError) as e:
            raise RunError(str(e))
        print(f"ray: {config.evaluator.parallel_evaluations} evaluations at once on the cluster", file=sys.stderr)
        settings.parallel = config.evaluator.parallel_evaluations
    else:  # this machine decides (plasa_lab.hardware): GPU memory and cores, or the measured best CPU split
        config.evaluator.parallel_evaluations = settings.parallel
        print(f"evaluations: {settings.slots_reason}", file=sys.stderr)
    os.environ.update(settings.to_env())  # OpenEvolve's worker processes call the evaluator with these

    if options.resume:
        lost = discard_unsaved_iterations(run_dir, done)
        where = (
            f"checkpoint_{done} (iteration {done} of {total})"
            if checkpoint
            else "no checkpoint yet: starting from the initial program, whose evaluation is in the ledger"
        )
        print(
            f"resuming {run_dir} from {where}"
            + (
                f"; {lost} record(s) of iterations after it moved to {TRACE_LOST} (their checkpoint was never written)"
                if lost
                else ""
            ),
            file=sys.stderr,
        )
    record = previous or dict(created=datetime.now(timezone.utc).isoformat(timespec="seconds"), resumes=[])
    record.update(
        command=" ".join(sys.argv),
        config=raw_config,
        config_path=str(options.config),
        versions=_versions(),
        corpus=dict(corpus.summary()),
        profile=profile.as_dict(),
        llm=dict(
            mode=choice.mode,
            models=choice.models,
            api_base=choice.api_base,
            note=choice.note,
            prompt="compact" if choice.compact else "full",
            timeout=choice.timeout,
        ),
        iterations_total=total,
        target_ppl=options.target_ppl,
        ledger=settings.ledger,
        settings=settings.record(),
        sandbox=dict(isolation=settings.sandbox)
        if settings.sandbox == "bwrap"
        else dict(isolation=settings.sandbox, warning=UNISOLATED_WARNING),
    )
    if options.resume:
        record["resumes"].append(
            dict(
                at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                checkpoint=str(checkpoint[0]) if checkpoint else None,
                iteration=done,
            )
        )
    write_run_json(run_dir, record)
    say = lambda line: print(line, file=sys.stderr, flush=True)
    say(
        f"run: {run_dir} | profile {profile.name} | {choice.note} | corpus {corpus.name} ({corpus.fingerprint[:12]}) "
        f"| iterations {done + 1}..{total} | seeds {', '.join(map(str, settings.seeds))}"
    )

    try:
        floor, initial_metrics = evaluate_initial_program(settings, say)
    except Stopped as e:
        say(
            f"stopped ({e}) while evaluating the initial program, before iteration {done + 1}; its finished "
            f"evaluations are in the ledger. {resume_line(run_dir)}"
        )
        return STOPPED_EXIT
    cal = calibration(settings, Ledger(settings.ledger), corpus.fingerprint)
    per_child = expected_seconds_per_child(cal, settings)
    record.update(
        noise_floor=floor.record(),
        calibration=cal.record(profile, profile.val_windows),
        expected_seconds_per_child=per_child,
    )
    write_run_json(run_dir, record)
    if floor.sd is not None:
        say(
            f"noise floor: val_loss sd {floor.sd:.4f} over seeds {', '.join(map(str, floor.seeds))} (val_ppl "
            f"{', '.join(f'{math.exp(v):.1f}' for v in floor.val_losses)}); a child whose first seed comes within "
            f"{settings.confirm_margin:g} sd of the best confirmed program is trained on every seed before it can win "
            f"(confirmations take at most {settings.confirm_share:.0%} of the stage-2 trainings)"
        )
    limits = cal.record(profile, profile.val_windows)["limits_seconds"]
    say(
        f"time limits: {cal.multiple:g}x the initial program's time here: stage 1 {limits['stage1']:.0f} s, "
        f"stage 2 {limits['stage2']:.0f} s (PLASA_TIME_LIMIT sets the multiple)"
    )
    if per_child:
        say(
            f"{total - done} iteration(s): about {hours(per_child * (total - done))} here "
            f"({per_child / 60:.1f} min per child; each confirmation seed adds {cal.stage2_seconds / 60:.1f} min)"
        )
    best = Best(_best_so_far(checkpoint) or initial_metrics, floor.val_losses)
    return _evolve(config, run_dir, checkpoint, done, total, options.target_ppl, best, per_child, settings)


def _best_so_far(checkpoint) -> dict | None:
    """OpenEvolve's best at the checkpoint we resume from."""
    if checkpoint:
        try:
            return json.loads((checkpoint[0] / "best_program_info.json").read_text()).get("metrics")
        except (OSError, ValueError):
            return None
    return None


def _construct_quietly(*args, **kwargs):
    """OpenEvolve(...) with its console handler turned down to warnings: INFO goes to the run's
    log file, and the console shows our progress instead."""
    from openevolve.controller import OpenEvolve

    with contextlib.redirect_stderr(io.StringIO()):  # the handler it adds would print the set-up chatter
        controller = OpenEvolve(*args, **kwargs)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)
            handler.setStream(sys.stderr)
    return controller


def _evolve(
    config, run_dir: Path, checkpoint, done: int, total: int, target_ppl, best: Best, per_child, settings: Settings
) -> int:
    from openevolve.controller import EvolutionFailedError

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stopped = False
    controller = _construct_quietly(str(INITIAL_PROGRAM), str(EVALUATOR), config, output_dir=str(run_dir))
    progress = Progress(run_dir, done + 1, total, best, per_child, config.llm.models[0].name)
    target = 1.0 / target_ppl if target_ppl else None
    failed, started = None, time.time()
    progress.start()
    try:
        # Until OpenEvolve installs its own graceful handlers, a stop is ours (Stopped); its second
        # Ctrl-C calls sys.exit(0): both end below with a checkpoint and the resume line.
        with stop_on_signals():
            asyncio.run(
                controller.run(
                    iterations=total - done,
                    target_score=target,
                    checkpoint_path=str(checkpoint[0]) if checkpoint else None,
                )
            )
    except EvolutionFailedError as e:
        failed = str(e)
    except (Stopped, KeyboardInterrupt, SystemExit):
        stopped = True
    finally:
        progress.stop_event.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a stop the progress thread sent just now lands nowhere
        progress.join(10)
        signal.signal(signal.SIGINT, handlers[0])  # OpenEvolve leaves its handlers installed
        signal.signal(signal.SIGTERM, handlers[1])

    reached = controller.database.last_iteration
    finished = {r["iteration"] for name in (TRACE, TRACE_FAILURES) for r in read_jsonl(run_dir / name)}
    missing = set(range(done + 1, total + 1)) - finished  # every finished iteration leaves a trace line
    best_program = controller.database.get_best_program()
    best_metrics = best_program.metrics if best_program else {}
    target_hit = bool(target and best_metrics.get("combined_score", 0) >= target)
    time_line = _time_accounting(run_dir, settings, started, done, reached)
    if (missing or stopped) and not target_hit and failed is None:  # stopped by Ctrl-C or SIGTERM
        with second_stops_ignored():
            with contextlib.suppress(Exception):
                controller._save_checkpoint(reached)  # OpenEvolve writes none after a shutdown request
                controller._save_best_program()  # nor best/ after a second Ctrl-C (its sys.exit)
            # Evaluations still in flight (a second stop cut OpenEvolve's wait for them) are lost, as a
            # stop promises; without this, leaving would wait for them (its worker pool joins at exit).
            for worker in multiprocessing.active_children():
                worker.kill()
            if progress.stop_reason:  # not the user's stop: the LLM keeps failing
                raise RunError(
                    f"stopped at iteration {reached} of {total} after {progress.stop_reason}; fix the LLM, "
                    f"then: {resume_line(run_dir).removeprefix('Resume with: ')}"
                )
            print(
                f"stopped at iteration {reached} of {total}; checkpoint saved in {run_dir / rundir.CHECKPOINTS}. "
                f"{resume_line(run_dir)}",
                file=sys.stderr,
            )
            return STOPPED_EXIT

    children = read_jsonl(run_dir / TRACE)
    passed = [r for r in children if child_ppl(r.get("child_metrics")) is not None]
    if progress.stop_reason:  # OpenEvolve ran out of iterations before the stop reached it
        failed = f"{progress.stop_reason}; fix the LLM, then: {resume_line(run_dir).removeprefix('Resume with: ')}"
    if failed or not passed:
        last = next(
            (
                r.get("artifacts", {}).get("failure")
                for r in reversed(children)
                if (r.get("artifacts") or {}).get("failure")
            ),
            None,
        )
        raise RunError(
            failed
            or f"no child could be evaluated: {len(children)} children, none passed"
            + (f"; last failure: {last}" if last else "")
        )
    summary = Best(best_metrics, best.initial_losses).describe()
    print(
        f"done: iteration {reached} of {total}; {len(passed)} of {len(children)} children passed; {summary} "
        f"({run_dir / rundir.BEST_PROGRAM})",
        file=sys.stderr,
    )
    print(time_line, file=sys.stderr)
    if settings.noise_aware:
        print(_confirmation_accounting(run_dir, settings), file=sys.stderr)
    return 0


def _confirmation_accounting(run_dir: Path, settings: Settings) -> str:
    """The share of the run's stage-2 trainings spent confirming contenders (recorded in run.json)."""
    spent, trainings = confirmation_count(settings, Ledger(settings.ledger), corpus_of(settings.corpus).fingerprint)
    share = spent / max(1, trainings)
    with contextlib.suppress(Exception):
        record = rundir.read_run_record(run_dir) or {}
        record["confirmation"] = dict(
            confirmation_trainings=spent, stage2_trainings=trainings, share=round(share, 3), cap=settings.confirm_share
        )
        write_run_json(run_dir, record)
    return (
        f"confirmations: {spent} of {trainings} stage-2 trainings ({share:.0%}; PLASA_CONFIRM_SHARE caps them "
        f"at {settings.confirm_share:.0%})"
    )


def _time_accounting(run_dir: Path, settings: Settings, started: float, done: int, reached: int) -> str:
    """Where this session's wall time went, per evaluation slot: waiting on the LLM, evaluating, the rest
    (OpenEvolve's own work, ledger answers, idle slots). Recorded in run.json."""
    wall = max(1e-9, time.time() - started)
    slots = wall * max(1, settings.parallel)
    evaluating = sum(r["seconds"] for r in Ledger(settings.ledger).rows() if r["created_at"] >= started)
    llm = sum(
        float(r.get("seconds") or 0)
        for r in read_jsonl(run_dir / rundir.LLM_RESPONSES)
        if done < int(r.get("iteration") or 0) <= reached
    )
    shares = dict(llm=min(1.0, llm / slots), evaluations=min(1.0, evaluating / slots))
    shares["idle_or_other"] = max(0.0, 1.0 - shares["llm"] - shares["evaluations"])
    with contextlib.suppress(Exception):
        record = rundir.read_run_record(run_dir) or {}
        record.setdefault("time_accounting", []).append(
            dict(
                wall_seconds=round(wall, 1),
                parallel=settings.parallel,
                llm_seconds=round(llm, 1),
                evaluation_seconds=round(evaluating, 1),
                shares={k: round(v, 3) for k, v in shares.items()},
            )
        )
        write_run_json(run_dir, record)
    limit = "the LLM" if shares["llm"] > shares["evaluations"] else "the evaluations"
    return (
        f"time: {hours(wall)} wall, {settings.parallel} evaluation slot(s): {shares['llm']:.0%} waiting on the LLM, "
        f"{shares['evaluations']:.0%} evaluating, {shares['idle_or_other']:.0%} idle or other; {limit} limited this run"
    )
