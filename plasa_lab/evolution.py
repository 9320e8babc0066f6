"""An evolution run: OpenEvolve configured for PLASA, launched or resumed, watched, summarised.

OpenEvolve does the search; this module adds what an overnight run needs around it: a checked
config, an LLM (API, local server, or the offline mutator), a reachable endpoint before the start,
the initial program evaluated first (a broken set-up fails in minutes, not in the morning),
run.json, live progress, resume to a total, a checkpoint on Ctrl-C, and a non-zero exit when no
child could be evaluated (OpenEvolve exits 0 then).
"""

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from . import INITIAL_PROGRAM, PROJECT_ROOT, data
from .evaluation import Settings, evaluate_file
from .mutator import NAME as OFFLINE_MODEL_NAME
from .profiles import get_profile

OUTPUT_ROOT = PROJECT_ROOT / "openevolve_output"
EVALUATOR = PROJECT_ROOT / "evaluator.py"
TRACE = "evolution_trace.jsonl"
TRACE_FAILURES = "evolution_trace_failures.jsonl"


class RunError(Exception):
    """Why a run cannot start or did not produce anything; one line."""


# ---------------------------------------------------------------------------------------------
# Config

def unknown_config_keys(raw: dict) -> list[str]:
    """Dotted paths of keys in a config dict that OpenEvolve's dataclasses do not define."""
    from openevolve.config import (Config, DatabaseConfig, EvaluatorConfig, EvolutionTraceConfig, LLMConfig,
                                   LLMModelConfig, PromptConfig)
    sections = dict(llm=LLMConfig, prompt=PromptConfig, database=DatabaseConfig, evaluator=EvaluatorConfig,
                    evolution_trace=EvolutionTraceConfig)

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
    except yaml.YAMLError as e:
        raise RunError(f"{path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(raw, dict):
        raise RunError(f"{path} must hold a YAML mapping")
    bad = unknown_config_keys(raw)
    if bad:
        raise RunError(f"{path}: unknown OpenEvolve keys (it would ignore them silently): {', '.join(bad)}")
    try:
        return Config.from_yaml(path), raw
    except Exception as e:  # dacite type errors and OpenEvolve's own validation
        raise RunError(f"{path}: {type(e).__name__}: {str(e).splitlines()[0]}")


# ---------------------------------------------------------------------------------------------
# LLM

@dataclass
class LLMChoice:
    mode: str  # api | local | offline
    api_base: str | None
    models: list[str]
    note: str


def choose_llm(mode: str | None, api_base: str | None, model: str | None, config) -> LLMChoice:
    env_key, env_base = os.environ.get("OPENAI_API_KEY"), os.environ.get("OPENAI_API_BASE")
    if mode is None:
        mode = "api" if env_key else "offline"
        if mode == "offline":
            print("No OPENAI_API_KEY set: using the offline mutator (a seeded LLM-free search operator; "
                  "pass --llm api or --llm local to use a model).", file=sys.stderr)
    if mode == "offline":
        return LLMChoice("offline", None, [OFFLINE_MODEL_NAME],
                         "offline mutator: seeded LLM-free edits inside the EVOLVE-BLOCKs (the no-LLM baseline)")
    base = api_base or env_base or (config.llm.api_base if mode == "api" else None)
    if not base:
        raise RunError("--llm local needs --api-base URL (or OPENAI_API_BASE), e.g. http://127.0.0.1:8000/v1")
    if mode == "api" and not env_key:
        raise RunError("--llm api needs OPENAI_API_KEY in the environment (or use --llm offline)")
    models = [model] if model else [m.name for m in config.llm.models]
    return LLMChoice(mode, base, models, f"{mode} LLM at {base}")


def check_endpoint(api_base: str, timeout: float = 10.0):
    """Fail fast, before any training, when the LLM server cannot be reached or refuses the key."""
    import openai
    client = openai.OpenAI(base_url=api_base, api_key=os.environ.get("OPENAI_API_KEY") or "none",
                           timeout=timeout, max_retries=0)
    try:
        client.models.list()
    except openai.AuthenticationError:
        raise RunError(f"the LLM endpoint {api_base} rejected the API key (401): check OPENAI_API_KEY")
    except openai.APIConnectionError as e:
        cause = e.__cause__ or e
        raise RunError(f"cannot reach the LLM endpoint {api_base}: {type(cause).__name__}: {cause}")
    except openai.APIStatusError:
        pass  # it answered; some OpenAI-compatible servers have no /models


def configure_llm(config, choice: LLMChoice):
    from .mutator import offline_client
    if choice.mode == "offline":
        config.llm.models = config.llm.models[:1]
        config.llm.models[0].name = OFFLINE_MODEL_NAME
        config.llm.models[0].init_client = offline_client
    else:
        template = config.llm.models[0]
        config.llm.models = [dataclasses.replace(template, name=name, api_base=choice.api_base, weight=1.0)
                             for name in choice.models]
        if choice.mode == "local":
            for m in config.llm.models:
                m.api_key = os.environ.get("OPENAI_API_KEY") or "local"  # llama.cpp and friends ignore it
    config.llm.evaluator_models = list(config.llm.models)


# ---------------------------------------------------------------------------------------------
# Run folder

def latest_checkpoint(run_dir: Path):
    """(path, iteration) of the newest complete checkpoint, or None."""
    best = None
    for path in (run_dir / "checkpoints").glob("checkpoint_*"):
        try:
            meta = json.loads((path / "metadata.json").read_text())
            iteration = int(meta["last_iteration"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # partly written (killed mid-save): skip it
        if best is None or iteration > best[1]:
            best = (path, iteration)
    return best


def newest_run(root: Path = OUTPUT_ROOT):
    runs = [p for p in root.glob("*/") if (p / "run.json").exists()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _versions():
    import openevolve
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(python=platform.python_version(), torch=torch.__version__, openevolve=openevolve.__version__,
                project_commit=commit)


def write_run_json(run_dir: Path, record: dict):
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, run_dir / "run.json")


# ---------------------------------------------------------------------------------------------
# Progress

def read_jsonl(path: Path) -> list[dict]:
    """Complete lines of a JSONL file that is being written (a torn last line is skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def child_ppl(metrics: dict | None):
    """A child's val_ppl if it passed evaluation, else None."""
    metrics = metrics or {}
    return metrics.get("val_ppl") if (metrics.get("combined_score") or 0.0) > 0 else None


class Progress(threading.Thread):
    """Tails the evolution trace: one line per finished iteration and a live bar on a terminal."""

    def __init__(self, run_dir: Path, first: int, last: int, best: dict | None):
        super().__init__(daemon=True)
        from rich.console import Console
        self.run_dir, self.first, self.last = run_dir, first, last
        self.best_score, self.best_ppl = (best["combined_score"], best["val_ppl"]) if best else (0.0, None)
        self.console = Console(stderr=True)
        self.seen, self.stop_event, self.started = set(), threading.Event(), time.monotonic()

    def run(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn
        with Bar(TextColumn("[bold]evolve"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 TextColumn("{task.fields[status]}"), console=self.console, transient=True) as bar:
            task = bar.add_task("", total=self.last - self.first + 1, status=self._status())
            while not self.stop_event.wait(1.0):
                self.poll(lambda line: bar.console.print(line))
                bar.update(task, completed=len(self.seen), status=self._status())
            self.poll(lambda line: bar.console.print(line))

    def _status(self):
        return f"best val_ppl {self.best_ppl:.1f}" if self.best_ppl else "no passing child yet"

    def poll(self, emit):
        events = [(r["iteration"], r.get("child_metrics") or {}, r.get("artifacts") or {}, None)
                  for r in read_jsonl(self.run_dir / TRACE)]
        events += [(r["iteration"], None, None, r.get("error")) for r in read_jsonl(self.run_dir / TRACE_FAILURES)]
        for iteration, metrics, artifacts, error in sorted(events, key=lambda e: e[0]):
            if iteration in self.seen or not self.first <= iteration <= self.last:
                continue
            self.seen.add(iteration)
            eta = (time.monotonic() - self.started) / len(self.seen) * (self.last - self.first + 1 - len(self.seen))
            ppl = child_ppl(metrics) if metrics is not None else None
            if ppl is not None:
                if metrics["combined_score"] > self.best_score:  # OpenEvolve's notion of best
                    self.best_score, self.best_ppl = metrics["combined_score"], ppl
                outcome = f"val_ppl {ppl:.1f}"
            elif metrics is not None:
                outcome = f"rejected: {str(artifacts.get('failure', 'score 0'))[:110]}"
            else:
                outcome = f"no child: {str(error)[:110]}"
            emit(f"iteration {iteration}/{self.last}: {outcome} | {self._status()} | ETA {eta / 60:.0f} min")


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


def _run_dir(options: RunOptions):
    if options.resume:
        run_dir = options.output or newest_run()
        if run_dir is None or not (Path(run_dir) / "run.json").exists():
            raise RunError(f"nothing to resume: {run_dir or OUTPUT_ROOT} holds no run (run.json missing)")
        return Path(run_dir)
    if options.output:
        run_dir = Path(options.output)
        if (run_dir / "run.json").exists():
            raise RunError(f"{run_dir} already holds a run: add --resume to continue it, or choose another --output")
        return run_dir
    return OUTPUT_ROOT / datetime.now().strftime("run-%Y%m%d-%H%M%S")


def run(options: RunOptions) -> int:
    """Launch or resume a run; returns the process exit code."""
    config, raw_config = load_config(options.config)
    run_dir = _run_dir(options)
    previous = json.loads((run_dir / "run.json").read_text()) if options.resume else None
    profile = get_profile(options.profile or (previous["profile"]["name"] if previous else None))
    if previous and profile.name != previous["profile"]["name"]:
        raise RunError(f"this run uses the {previous['profile']['name']} profile; resuming it with "
                       f"{profile.name} would mix incomparable scores")
    total = options.iterations if options.iterations is not None else (
        (previous or {}).get("iterations_total") or config.max_iterations)
    if total < 1:
        raise RunError(f"--iterations must be at least 1, got {total}")

    same_llm = previous and options.llm in (None, previous["llm"]["mode"])
    choice = choose_llm(options.llm or (previous["llm"]["mode"] if previous else None),
                        options.api_base or (previous["llm"]["api_base"] if same_llm else None), options.model, config)
    if choice.mode != "offline":
        check_endpoint(choice.api_base)
    configure_llm(config, choice)

    checkpoint = latest_checkpoint(run_dir) if options.resume else None
    done = checkpoint[1] if checkpoint else 0
    if done >= total:
        print(f"{run_dir}: already at iteration {done} of {total}; nothing to do (raise --iterations to go on).")
        return 0

    corpus_name = options.corpus or (previous["corpus"]["corpus"] if previous else None)  # a resume keeps its corpus
    corpus = data.prepare_corpus(corpus_name or os.environ.get("PLASA_CORPUS") or "auto",
                                 log=lambda line: print(line, file=sys.stderr))
    if previous and previous["corpus"]["fingerprint"] != corpus.fingerprint:
        raise RunError(f"the token cache changed since this run started (fingerprint {corpus.fingerprint[:12]}, "
                       f"run {previous['corpus']['fingerprint'][:12]}): its scores would not compare")
    run_dir.mkdir(parents=True, exist_ok=True)
    if options.runner:
        os.environ["PLASA_RUNNER"] = options.runner
    if os.environ.get("PLASA_RUNNER") == "ray":
        from .ray_runner import parallel_evaluations
        threads = int(os.environ.get("PLASA_THREADS", "2"))
        try:
            config.evaluator.parallel_evaluations = parallel_evaluations(threads)
        except (ConnectionError, OSError, subprocess.SubprocessError) as e:
            raise RunError(str(e))
        print(f"ray: {config.evaluator.parallel_evaluations} evaluations at once on the cluster "
              f"({threads} CPUs each, or one GPU each where the cluster has GPUs)", file=sys.stderr)
    # The evaluator reads these in OpenEvolve's worker processes (they inherit the environment).
    # A ledger given in $PLASA_LEDGER is shared between runs; by default each run has its own.
    os.environ.update(PLASA_PROFILE=profile.name, PLASA_CORPUS=corpus.name,
                      PLASA_PARALLEL=str(config.evaluator.parallel_evaluations))
    os.environ.setdefault("PLASA_LEDGER", (previous or {}).get("ledger") or str(run_dir / "ledger.sqlite"))
    if options.device:
        os.environ["PLASA_DEVICE"] = options.device
    if options.target_ppl is not None and options.target_ppl <= 0:
        raise RunError(f"--target-ppl must be positive, got {options.target_ppl}")

    record = previous or dict(created=datetime.now(timezone.utc).isoformat(timespec="seconds"), resumes=[])
    record.update(command=" ".join(sys.argv), config=raw_config, config_path=str(options.config),
                  versions=_versions(), corpus=dict(corpus.summary()), profile=profile.as_dict(),
                  llm=dict(mode=choice.mode, models=choice.models, api_base=choice.api_base, note=choice.note),
                  iterations_total=total, target_ppl=options.target_ppl, ledger=os.environ["PLASA_LEDGER"])
    if checkpoint:
        record["resumes"].append(dict(at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                      checkpoint=str(checkpoint[0]), iteration=done))
    write_run_json(run_dir, record)
    print(f"run: {run_dir} | profile {profile.name} | {choice.note} | corpus {corpus.name} "
          f"({corpus.fingerprint[:12]}) | iterations {done + 1}..{total}", file=sys.stderr)

    if checkpoint:  # the best so far, for the progress line
        info = checkpoint[0] / "best_program_info.json"
        seed_metrics = json.loads(info.read_text()).get("metrics") if info.exists() else None
    else:
        seed_metrics = _evaluate_initial_program()
    return _evolve(config, run_dir, checkpoint, done, total, options.target_ppl, seed_metrics)


def _evaluate_initial_program():
    """Evaluate the seed ourselves first (OpenEvolve then finds it in the ledger): a broken set-up
    fails now, with its reason, and the longest single wait shows progress."""
    print("evaluating the initial program (stage 1, then stage 2)...", file=sys.stderr)
    evaluation = evaluate_file(INITIAL_PROGRAM, "all", Settings(),
                               on_line=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    if not evaluation.passed:
        raise RunError(f"the initial program fails its own evaluation: {evaluation.artifacts.get('failure')}")
    m = evaluation.metrics
    print(f"initial program: val_ppl {m['val_ppl']:.1f}, val_acc {m['val_acc']:.3f}", file=sys.stderr)
    return m


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


def _evolve(config, run_dir: Path, checkpoint, done: int, total: int, target_ppl, seed_metrics) -> int:
    from openevolve.controller import EvolutionFailedError

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    controller = _construct_quietly(str(INITIAL_PROGRAM), str(EVALUATOR), config, output_dir=str(run_dir))
    progress = Progress(run_dir, done + 1, total, seed_metrics)
    progress.start()
    target = 1.0 / target_ppl if target_ppl else None
    failed = None
    try:
        asyncio.run(controller.run(iterations=total - done, target_score=target,
                                   checkpoint_path=str(checkpoint[0]) if checkpoint else None))
    except EvolutionFailedError as e:
        failed = str(e)
    finally:
        signal.signal(signal.SIGINT, handlers[0])  # OpenEvolve leaves its handlers installed
        signal.signal(signal.SIGTERM, handlers[1])
        progress.stop_event.set()
        progress.join(10)

    reached = controller.database.last_iteration
    best = controller.database.get_best_program()
    best_metrics = best.metrics if best else {}
    finished = {r["iteration"] for name in (TRACE, TRACE_FAILURES) for r in read_jsonl(run_dir / name)}
    missing = set(range(done + 1, total + 1)) - finished  # every finished iteration leaves a trace line
    target_hit = bool(target and best_metrics.get("combined_score", 0) >= target)
    if missing and not target_hit and failed is None:  # stopped by Ctrl-C or SIGTERM
        controller._save_checkpoint(reached)  # OpenEvolve writes none after a shutdown request
        print(f"stopped at iteration {reached} of {total}; checkpoint saved in {run_dir / 'checkpoints'}. "
              f"Resume with: python scripts/evolve.py --resume --output {run_dir}", file=sys.stderr)
        return 130

    children = [r for r in read_jsonl(run_dir / TRACE)]
    passed = [r for r in children if child_ppl(r.get("child_metrics")) is not None]
    if failed or not passed:
        last = next((r.get("artifacts", {}).get("failure") for r in reversed(children)
                     if (r.get("artifacts") or {}).get("failure")), None)
        raise RunError(failed or f"no child could be evaluated: {len(children)} children, none passed"
                       + (f"; last failure: {last}" if last else ""))
    ppl = best_metrics.get("val_ppl")
    print(f"done: iteration {reached} of {total}; {len(passed)} of {len(children)} children passed; best val_ppl "
          f"{ppl:.1f} ({run_dir / 'best' / 'best_program.py'})", file=sys.stderr)
    return 0
