"""Before the search: a run planned (every check made, nothing written), then started (run.json
written, the initial program evaluated on every seed of the run).

`plan_run` resolves everything a run needs from the command line and, for a resume, from the run's
own record: the folder, the settings (a resume keeps its profile, corpus, seeds and ledger), the
LLM (whose endpoint must complete a prompt like the run's first), the OS isolation, the corpus and
its fingerprint, the checkpoint a resume starts from, and how many evaluations run at once. Any
problem is one line (RunError) before anything is written.

`start_run` writes run.json and evaluates the initial program: stage 1, then stage 2 on every
seed (ledger first). A broken set-up fails then with its reason, the seeds give the run its noise
floor, and the timings calibrate every time limit.
"""

import copy
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import INITIAL_PROGRAM, PROJECT_ROOT, rundir
from ..contract import HARNESS_VERSION, Profile, get_profile
from ..data.tokens import Corpus
from ..evaluation.fitness import screen_settings, screened_stage2
from ..evaluation.ledger import Ledger, LedgerError
from ..evaluation.parallel import in_slots
from ..evaluation.sandbox import UNISOLATED_WARNING, SandboxUnavailable, require_isolation
from ..evaluation.stage import Calibration, calibration, corpus_of, evaluate_stage
from ..program.checks import integrity_violation
from ..rundir import OUTPUT_ROOT, TRACE_LOST, latest_checkpoint
from ..settings import Settings
from ..stats import mean_sd
from .llm_setup import LLMChoice, check_endpoint, choose_llm, configure_llm
from .llm_usage import TokenMeter
from .progress import hours, say
from .run_config import RunError, load_config
from .stops import Stopped


@dataclass
class RunOptions:
    """What scripts/evolve.py was asked (None: the default, or for a resume what the run started with)."""

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
    seeds: list[int] | None = None  # noise floor and confirmation seeds (cli.seed_list)
    prompt: str | None = None  # compact | full (default: compact for --llm local)
    no_notebook: bool = False  # leave the lab notebook out of the prompts (a resume keeps the run's choice)
    screen: str | None = None  # none | quick | smoke: a cheaper first look at every child (a resume keeps it)
    answer: str | None = None  # diff | block: the LLM's answer format (a resume keeps the run's)
    max_llm_tokens: int | None = None  # the run's LLM token budget, resumes included (a resume keeps it)
    price_per_million: tuple[float, float] | None = None  # dollars per million prompt, completion tokens
    proposals_ahead: int | None = None  # iterations in flight beyond the evaluation slots (default: 1 with an LLM)


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, resolved and checked."""

    run_dir: Path
    resume: bool
    previous: dict | None  # the run's record (run.json) when resuming it
    config: object  # OpenEvolve's Config, with this run's LLM and evaluation slots in it
    raw_config: dict  # the YAML as written: run.json keeps it
    config_path: Path
    settings: Settings  # every knob, resolved once; OpenEvolve's worker processes get it as PLASA_* variables
    llm: LLMChoice
    corpus: Corpus
    checkpoint: Path | None  # the newest complete checkpoint, where a resume starts
    done: int  # the iterations that checkpoint holds (0 for a new run)
    total: int  # the run's total, resumes included
    target_ppl: float | None
    proposals_ahead: int  # iterations in flight beyond the slots: the LLM writes while the slots train

    @property
    def profile(self) -> Profile:
        return get_profile(self.settings.profile)


DEFAULT_PROPOSALS_AHEAD = 1  # with an LLM: one child written while the slots train (see _proposals_ahead)
NO_CHECKPOINT = "no checkpoint yet: starting from the initial program, whose evaluation is in the ledger"


class NothingToDo(Exception):
    """A resume of a run that already reached its total: not an error (exit 0), one line."""


# ---------------------------------------------------------------------------------------------
# Planning: every check, nothing written


def plan_run(options: RunOptions) -> RunPlan:
    """The run the options ask for, checked; RunError (one line) when it cannot start, NothingToDo
    when a resume has already reached its total. It writes nothing of the run (the token cache is
    built if missing) and prints what it checks, the LLM's endpoint first: that check takes minutes
    on a CPU server, and the checks after it need what it resolved."""
    config, raw_config = load_config(options.config)
    run_dir = run_folder(options)
    previous = rundir.read_run_record(run_dir) if options.resume else None
    settings = run_settings(options, previous, run_dir)
    total = options.iterations
    if total is None:  # a resume keeps its total; a new run takes the config's
        total = (previous or {}).get("iterations_total") or config.max_iterations
    if total < 1:
        raise RunError(f"--iterations must be at least 1, got {total}")
    if options.proposals_ahead is not None and options.proposals_ahead < 0:
        raise RunError(f"--proposals-ahead must be at least 0, got {options.proposals_ahead}")
    if options.target_ppl is not None and options.target_ppl <= 0:
        raise RunError(f"--target-ppl must be positive, got {options.target_ppl}")
    checkpoint = latest_checkpoint(run_dir) if options.resume else None
    done = checkpoint[1] if checkpoint else 0
    if options.resume:  # which run, before anything is spent on it (the endpoint check can take minutes)
        where = f"{checkpoint[0].name} (iteration {done} of {total})" if checkpoint else NO_CHECKPOINT
        say(f"resuming {run_dir} (profile {settings.profile}) from {where}")
    if done >= total:
        raise NothingToDo(
            f"{run_dir}: already at iteration {done} of {total}; nothing to do (raise --iterations to go on)."
        )
    llm = _checked_llm(options, previous, config, run_dir)
    configure_llm(config, llm, run_dir)
    _check_isolation(settings)
    corpus = corpus_of(settings.corpus)
    if previous:
        _check_the_resume(previous, corpus, checkpoint[0] if checkpoint else None)
    settings.corpus = corpus.name
    ahead = _proposals_ahead(options, llm)
    config.evaluator.parallel_evaluations = _evaluation_slots(settings) + ahead  # OpenEvolve's iterations in flight
    settings.slot_dir = str(run_dir / rundir.SLOTS) if ahead else None  # trainings still at most settings.parallel
    return RunPlan(
        run_dir=run_dir,
        resume=options.resume,
        previous=previous,
        config=config,
        raw_config=raw_config,
        config_path=Path(options.config),
        settings=settings,
        llm=llm,
        corpus=corpus,
        checkpoint=checkpoint[0] if checkpoint else None,
        done=done,
        total=total,
        target_ppl=options.target_ppl,
        proposals_ahead=ahead,
    )


def run_folder(options: RunOptions) -> Path:
    """The run's folder: the one to resume (default: the newest run, rundir.newest_run), or a new one."""
    if options.resume:
        run_dir = options.output or rundir.newest_run()
        if run_dir is None or not (Path(run_dir) / rundir.RUN_RECORD).exists():
            raise RunError(f"nothing to resume: {run_dir or OUTPUT_ROOT} holds no run (run.json missing)")
        return Path(run_dir)
    if options.output:
        run_dir = Path(options.output)
        if (run_dir / rundir.RUN_RECORD).exists():
            raise RunError(f"{run_dir} already holds a run: add --resume to continue it, or choose another --output")
        return run_dir
    return OUTPUT_ROOT / datetime.now().strftime("run-%Y%m%d-%H%M%S")


def run_settings(options: RunOptions, previous: dict | None, run_dir: Path) -> Settings:
    """The run's settings, resolved once: a resume keeps the profile, corpus, seeds and ledger it started with."""
    before = (previous or {}).get("settings") or {}
    profile = options.profile or before.get("profile") or (previous or {}).get("profile", {}).get("name")
    if before and profile != before.get("profile"):
        raise RunError(
            f"this run uses the {before.get('profile')} profile; resuming it with {profile} would mix "
            f"incomparable scores"
        )
    seeds = options.seeds or before.get("seeds")
    if before and options.seeds and list(dict.fromkeys(options.seeds)) != before.get("seeds"):
        raise RunError(f"this run confirms on seeds {before.get('seeds')}; resuming it with others would mix scores")
    try:
        settings = Settings(
            profile=profile,
            corpus=options.corpus or before.get("corpus"),
            device=options.device or before.get("device"),
            runner=options.runner or before.get("runner"),
            seeds=seeds,
            ledger=before.get("ledger") or None,  # None: Settings reads $PLASA_LEDGER
            screen=options.screen or before.get("screen"),
            screen_share=before.get("screen_share"),  # None: $PLASA_SCREEN_SHARE, else the default
        )
    except ValueError as e:
        raise RunError(str(e)) from None
    settings.ledger = settings.ledger or str(run_dir / rundir.LEDGER)  # neither: the run's own
    settings.noise_aware = len(settings.seeds) > 1
    return settings


def _checked_llm(options: RunOptions, previous: dict | None, config, run_dir: Path) -> LLMChoice:
    """The LLM the options ask for (a resume keeps the run's mode, and its endpoint, prompts and answer
    format unless the mode changes, and its token budget and price unless given others), its budget
    not yet spent and its endpoint proved to answer."""
    before = (previous or {}).get("llm") or {}
    same_llm = previous is not None and options.llm in (None, before.get("mode"))
    choice = choose_llm(
        options.llm or before.get("mode"),
        options.api_base or (before.get("api_base") if same_llm else None),
        options.model,
        config,
        options.prompt or (before.get("prompt") if same_llm else None),
        notebook=not (options.no_notebook or (same_llm and before.get("notebook") is False)),
        answer=options.answer or (before.get("answer") if same_llm else None),
    )
    if choice.mode == "offline":
        return choice  # the mutator answers in SEARCH/REPLACE, and costs nothing
    price = options.price_per_million or before.get("price_per_million")
    choice = dataclasses.replace(
        choice,
        max_llm_tokens=options.max_llm_tokens or before.get("max_llm_tokens"),
        price_per_million=tuple(price) if price else None,
    )
    _check_the_budget(choice, run_dir)
    check_endpoint(choice, config)
    return choice


def _check_the_budget(llm: LLMChoice, run_dir: Path):
    """A resume of a run whose LLM tokens already reached its budget would stop at once: one line."""
    if llm.max_llm_tokens is None:
        return
    if llm.max_llm_tokens < 1:
        raise RunError(f"--max-llm-tokens must be at least 1, got {llm.max_llm_tokens}")
    used = TokenMeter(run_dir).update().total
    if used >= llm.max_llm_tokens:
        raise RunError(
            f"this run has used {used:,} LLM tokens, its budget is {llm.max_llm_tokens:,}: resume it with a "
            f"larger --max-llm-tokens to go on"
        )


def _check_isolation(settings: Settings):
    try:
        require_isolation(settings.sandbox)
    except SandboxUnavailable as e:
        raise RunError(f"cannot isolate the children: {e}") from None
    if settings.sandbox != "bwrap":
        say(f"WARNING: {UNISOLATED_WARNING}")


def _evaluation_slots(settings: Settings) -> int:
    """How many evaluations run at once: the Ray cluster's share, or what this machine holds
    (plasa_lab.evaluation.hardware: GPU memory and cores, or the measured best CPU split)."""
    if settings.runner == "ray":
        from ..evaluation.ray_runner import parallel_evaluations

        try:
            settings.parallel = parallel_evaluations(settings.threads)
        except (ConnectionError, OSError, subprocess.SubprocessError) as e:
            raise RunError(str(e)) from None
        say(f"ray: {settings.parallel} evaluations at once on the cluster")
    else:
        say(f"evaluations: {settings.slots_reason}")
    return settings.parallel


def _proposals_ahead(options: RunOptions, llm: LLMChoice) -> int:
    """Iterations OpenEvolve runs beyond the evaluation slots. Each of its iterations is an LLM call,
    then an evaluation, in one worker; with one more worker than slots the LLM writes the next child
    while the slots train, and the slots (evaluation.slots) keep the trainings at their number. The
    offline mutator answers at once: nothing to overlap, and a child made ahead only sees an older
    population."""
    if options.proposals_ahead is not None:
        return options.proposals_ahead
    return 0 if llm.mode == "offline" else DEFAULT_PROPOSALS_AHEAD


def _check_the_resume(previous: dict, corpus: Corpus, checkpoint: Path | None):
    """A resumed run's scores must compare with its first ones, and its children must be able to pass."""
    if previous["corpus"]["fingerprint"] != corpus.fingerprint:
        raise RunError(
            f"the token cache changed since this run started (fingerprint {corpus.fingerprint[:12]}, "
            f"run {previous['corpus']['fingerprint'][:12]}): its scores would not compare"
        )
    if checkpoint and (problem := fixed_code_drift(checkpoint)):
        commit = (previous.get("versions") or {}).get("project_commit") or "?"
        raise RunError(
            f"this run's programs were made from another initial_program.py ({problem}): every child would "
            f"fail; resume it at the commit it started from ({commit[:12]}) or start a new run"
        )


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


# ---------------------------------------------------------------------------------------------
# Starting: run.json, then the initial program


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class RunStart:
    """What the initial program's evaluation gave the run."""

    noise_floor: NoiseFloor
    initial_metrics: dict  # what OpenEvolve files for it: the run's first best
    seconds_per_child: float | None  # expected, on this machine (None: nothing measured)


def start_run(plan: RunPlan) -> RunStart:
    """run.json written, then the initial program evaluated; Stopped says so when a stop comes during it."""
    try:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        Ledger(plan.settings.ledger)
    except OSError as e:
        raise RunError(f"cannot write the run folder {plan.run_dir}: {e.strerror or e}") from None
    except LedgerError as e:
        raise RunError(str(e)) from None
    os.environ.update(plan.settings.to_env())  # OpenEvolve's worker processes call the evaluator with these
    if plan.resume:
        _set_aside_unsaved_iterations(plan)
    record = run_record(plan)
    rundir.write_run_record(plan.run_dir, record)
    settings, corpus = plan.settings, plan.corpus
    say(
        f"run: {plan.run_dir} | profile {settings.profile} | {plan.llm.note} | corpus {corpus.name} "
        f"({corpus.fingerprint[:12]}) | iterations {plan.done + 1}..{plan.total} "
        f"| seeds {', '.join(map(str, settings.seeds))}"
    )
    try:
        floor, initial_metrics = evaluate_initial_program(settings)
    except Stopped as stop:
        raise Stopped(stop.signum, during="while evaluating the initial program") from None
    ledger = Ledger(settings.ledger)
    cal = calibration(settings, ledger, corpus.fingerprint)
    screen = calibration(screen_settings(settings), ledger, corpus.fingerprint) if settings.screen != "none" else None
    per_child = expected_seconds_per_child(cal, settings, screen)
    record.update(
        noise_floor=floor.record(),
        calibration=cal.record(plan.profile, plan.profile.val_windows),
        expected_seconds_per_child=per_child,
    )
    rundir.write_run_record(plan.run_dir, record)
    _say_what_to_expect(plan, floor, cal, per_child)
    return RunStart(floor, initial_metrics, per_child)


def _set_aside_unsaved_iterations(plan: RunPlan):
    """plan_run said where the resume starts; this says what it set aside."""
    if lost := rundir.discard_unsaved_iterations(plan.run_dir, plan.done):
        say(
            f"{lost} record(s) of iterations after iteration {plan.done} moved to {TRACE_LOST} "
            "(their checkpoint was never written)"
        )


def run_record(plan: RunPlan) -> dict:
    """run.json as the run starts: what it is (config, versions, corpus, profile, LLM, settings,
    sandbox), kept from the run's first start on a resume, which adds itself to `resumes`."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = copy.deepcopy(plan.previous) if plan.previous else dict(created=now, resumes=[])
    settings, llm = plan.settings, plan.llm
    record.update(
        command=" ".join(sys.argv),
        config=plan.raw_config,
        config_path=str(plan.config_path),
        versions=_versions(),
        corpus=dict(plan.corpus.summary()),
        profile=plan.profile.as_dict(),
        llm=dict(
            mode=llm.mode,
            models=llm.models,
            api_base=llm.api_base,
            note=llm.note,
            prompt="compact" if llm.compact else "full",
            notebook=llm.notebook,
            timeout=llm.timeout,
            answer=llm.answer,
            max_llm_tokens=llm.max_llm_tokens,
            price_per_million=list(llm.price_per_million) if llm.price_per_million else None,
        ),
        iterations_total=plan.total,
        in_flight=dict(evaluation_slots=settings.parallel, proposals_ahead=plan.proposals_ahead),
        target_ppl=plan.target_ppl,
        ledger=settings.ledger,
        settings=settings.record(),
        sandbox=dict(isolation=settings.sandbox)
        if settings.sandbox == "bwrap"
        else dict(isolation=settings.sandbox, warning=UNISOLATED_WARNING),
    )
    if plan.resume:
        checkpoint = str(plan.checkpoint) if plan.checkpoint else None
        record["resumes"].append(dict(at=now, checkpoint=checkpoint, iteration=plan.done))
    return record


def _versions() -> dict:
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


def evaluate_initial_program(settings: Settings, evaluate=evaluate_stage) -> tuple[NoiseFloor, dict]:
    """Stage 1, then stage 2 on every seed of the run (ledger first), up to the run's evaluation slots
    at once: a broken set-up fails now with its reason, the seeds give the run its noise floor, and
    the timings calibrate every time limit. Lines come in seed order; the first seed that fails, in
    that order, ends it. `evaluate`: evaluate_stage's signature (a test's stand-in)."""
    code = INITIAL_PROGRAM.read_text()
    say(
        f"evaluating the initial program: stage 1, then stage 2 on seed{'s' * (len(settings.seeds) > 1)} "
        f"{', '.join(map(str, settings.seeds))} (the noise floor)"
    )
    first = evaluate(code, 1, settings, lambda line: say(f"  {line}"))
    if not first.passed:
        raise RunError(f"the initial program fails its own evaluation: {first.artifacts.get('failure')}")

    def stage2(seed):
        return evaluate(code, 2, settings, lambda line: say(f"  seed {seed}: {line}"), seed=seed)

    def check(seed, evaluation):
        if not evaluation.passed:
            raise RunError(
                f"the initial program fails its own evaluation (seed {seed}): {evaluation.artifacts.get('failure')}"
            )
        m = evaluation.metrics
        say(
            f"initial program, seed {seed}: val_ppl {m['val_ppl']:.1f}, val_acc {m['val_acc']:.3f} "
            f"({'from the ledger' if evaluation.from_ledger else f'{evaluation.seconds:.0f} s'})"
        )

    evaluations = in_slots(stage2, settings.seeds, settings.parallel, check)
    losses = [e.metrics["val_loss"] for e in evaluations]
    floor = NoiseFloor(list(settings.seeds), losses, mean_sd(losses)[1])
    # What OpenEvolve will file for it (the evaluator answers from the ledger): the run's first best,
    # and with a screening rung the first program screened, which every child's screen is ranked against.
    return floor, screened_stage2(code, settings).metrics


def expected_seconds_per_child(cal: Calibration, settings: Settings, screen: Calibration | None) -> float | None:
    """One child: stage 1 and stage 2 as the initial program needs them here (contenders add a stage 2
    per extra seed; that share is measured as the run goes). With a screening rung, stage 2 is the
    screen (`screen`: the initial program's times on the screen's profile) for every child and the
    full stage 2 for the share that goes on."""
    if cal.stage1_seconds is None or cal.stage2_seconds is None:
        return None
    stage2 = cal.stage2_seconds
    if settings.screen != "none":
        if screen is None or screen.stage2_seconds is None:
            return None
        stage2 = screen.stage2_seconds + settings.screen_share * cal.stage2_seconds
    return (cal.stage1_seconds + stage2) / settings.parallel


def _say_what_to_expect(plan: RunPlan, floor: NoiseFloor, cal: Calibration, per_child: float | None):
    """The noise floor, the time limits and what the rest of the run will cost, at its start."""
    settings = plan.settings
    if floor.sd is not None:
        say(
            f"noise floor: val_loss sd {floor.sd:.4f} over seeds {', '.join(map(str, floor.seeds))} (val_ppl "
            f"{', '.join(f'{math.exp(v):.1f}' for v in floor.val_losses)}); a child whose first seed comes within "
            f"{settings.confirm_margin:g} sd of the best confirmed program is trained on every seed before it can win "
            f"(confirmations take at most {settings.confirm_share:.0%} of the stage-2 trainings)"
        )
    if settings.screen != "none":
        say(
            f"screening: each child trains on the {settings.screen} profile first; the best {settings.screen_share:.0%}"
            f" of those screened (PLASA_SCREEN_SHARE) go on to the {settings.profile} profile"
        )
    limits = cal.record(plan.profile, plan.profile.val_windows)["limits_seconds"]
    say(
        f"time limits: {cal.multiple:g}x the initial program's time here: stage 1 {limits['stage1']:.0f} s, "
        f"stage 2 {limits['stage2']:.0f} s (PLASA_TIME_LIMIT sets the multiple)"
    )
    # The run's cost, said before the first child: the last line before the search spends anything.
    left = plan.total - plan.done
    which = (
        f"{left} iteration(s) to go ({plan.done + 1}..{plan.total} of {plan.total}) on the {settings.profile} profile"
    )
    if per_child:
        confirming = f"; each confirmation seed adds {cal.stage2_seconds / 60:.1f} min" if settings.noise_aware else ""
        say(f"{which}: about {hours(per_child * left)} here ({per_child / 60:.1f} min per child{confirming})")
    else:
        say(f"{which}: no time estimate (the initial program's times are not in the ledger)")
