"""The offline mutator: structural moves that stay inside the blocks, pass the static checks and
keep every block's contract at run time, crossover with another program the prompt shows, line
moves for blocks an LLM rewrote, and a parent's text that is read, never run."""

import asyncio
import hashlib
import random

import pytest
import torch
from openevolve.config import Config
from openevolve.prompt.sampler import PromptSampler
from openevolve.utils.code_utils import apply_diff, extract_diffs

from plasa_lab import INITIAL_PROGRAM, PROJECT_ROOT
from plasa_lab.program.blocks import load_program, split_blocks
from plasa_lab.program.checks import static_violation
from plasa_lab.search.llm_setup import first_prompt
from plasa_lab.search.mutator import (
    CHOICES,
    KNOBS,
    MOVES,
    WRITERS,
    Design,
    OfflineMutator,
    _valid,
    crossover,
    format_diff,
    other_programs,
    propose_edits,
    read_design,
    with_design,
)

SOURCE = INITIAL_PROGRAM.read_text()
CONFIG = PROJECT_ROOT / "config.yaml"
METRICS = {"combined_score": 0.0018, "val_ppl": 556.4, "density": 0.655, "indexer_params": 83968.0}
L, N_LAYERS, D_MODEL = 128, 4, 128


def chain(seed, length):
    """The program the mutator reaches from the initial one in `length` seeded moves, and their names."""
    code, rng, names = SOURCE, random.Random(seed), []
    for _ in range(length):
        edits = propose_edits(code, rng)
        names += [name for name, _, _ in edits]
        code = apply_diff(code, format_diff(edits))
    return code, names


def test_the_default_design_writes_the_initial_programs_blocks_to_the_byte():
    blocks = {b.name: b.body for b in split_blocks(SOURCE)[1]}
    assert {name: write(Design()) for name, write in WRITERS.items()} == blocks
    assert read_design(SOURCE) == (Design(), set(WRITERS))


def test_every_move_of_300_seeded_draws_edits_only_inside_blocks_and_passes_the_static_checks():
    seen = set()
    for seed in range(300):
        edits = propose_edits(SOURCE, random.Random(seed))
        diff = format_diff(edits)
        assert len(extract_diffs(diff)) == len(edits) >= 1
        child = apply_diff(SOURCE, diff)
        assert child != SOURCE and static_violation(child, SOURCE) is None, [e[0] for e in edits]
        assert diff.startswith(f"Offline mutator: {', '.join(dict.fromkeys(e[0] for e in edits))}.")
        seen |= {name for name, _, _ in edits}
    assert seen == {name for name, _, _ in MOVES}


def test_chains_of_moves_reach_structure_and_stay_readable_by_the_mutator():
    names = set()
    for code, chain_names in (chain(seed, 8) for seed in range(20)):
        assert static_violation(code, SOURCE) is None
        assert read_design(code)[1] == set(WRITERS)  # every block still one the mutator wrote
        names |= set(chain_names)
    structural = {"selection recent keys", "selection sink keys", "schedule per layer", "index score recency"}
    assert structural <= names


def keeps_every_block_contract(module):
    """The blocks' Must-hold lines, checked on random inputs: the schedule, a causal index score,
    exactly min(k, t+1) selected keys s <= t per query, a finite aux loss that reaches the indexer."""
    ks = module.layer_k_schedule(N_LAYERS, L)
    assert len(ks) == N_LAYERS and all(type(k) is int and 1 <= k <= L for k in ks) and len(set(ks)) > 1
    g = torch.Generator().manual_seed(0)
    for layer, k in enumerate(ks):
        indexer = module.LightningIndexer(D_MODEL, layer)
        module.init_indexer(indexer, layer)
        x = torch.randn(2, L, D_MODEL, generator=g)
        scores = indexer(x)
        cut = 40
        x2 = x.clone()
        x2[:, cut + 1 :] = torch.randn(2, L - cut - 1, D_MODEL, generator=g)
        assert torch.allclose(indexer(x2)[:, : cut + 1, : cut + 1], scores[:, : cut + 1, : cut + 1])
        selected = module.select_topk(scores.detach(), k, layer)
        t = torch.arange(L)
        assert selected.dtype == torch.bool and not (selected & (t[None, :] > t[:, None])).any()
        assert torch.equal(selected.sum(-1), torch.minimum(torch.tensor(k), t + 1).expand(2, L))
        attn = torch.rand(2, 4, L, L, generator=g).masked_fill(~selected[:, None], 0.0)
        attn = attn / attn.sum(-1, keepdim=True)
        loss = module.indexer_aux_loss(attn, scores, selected, layer)
        loss.backward()
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in indexer.parameters())


@pytest.mark.parametrize("seed", range(12))
def test_programs_the_moves_reach_keep_every_blocks_contract_at_run_time(seed, tmp_path):
    code, _ = chain(seed, 6)
    path = tmp_path / "child.py"
    path.write_text(code)
    keeps_every_block_contract(load_program(path))


@pytest.mark.parametrize("move, block, change", MOVES, ids=[m[0] for m in MOVES])
def test_each_move_alone_keeps_every_blocks_contract(move, block, change, tmp_path):
    design = change(Design(), random.Random(1))
    code = with_design(SOURCE, design)  # only this move's block differs from the initial design's
    assert code != SOURCE or len(set(design.schedule())) == 1
    if len(set(design.schedule())) == 1:
        pytest.skip("this draw gives one k everywhere, which propose_edits draws again")
    assert static_violation(code, SOURCE) is None
    path = tmp_path / "child.py"
    path.write_text(code)
    keeps_every_block_contract(load_program(path))
    assert module_schedule(path) == design.schedule()


def module_schedule(path):
    return load_program(path).layer_k_schedule(N_LAYERS, L)


def test_a_block_an_llm_rewrote_gets_line_moves_and_the_others_keep_their_structural_moves():
    code = SOURCE.replace("INDEXER_LOSS_WEIGHT = 0.1  #", "INDEXER_LOSS_WEIGHT = 0.07  # tuned by hand,")
    design, known = read_design(code)
    assert "indexer_training" not in known and len(known) == 3
    names = set()
    for seed in range(60):
        for name, old, new in propose_edits(code, random.Random(seed)):
            names.add(name)
            if name == "indexer loss weight":
                assert old.startswith("INDEXER_LOSS_WEIGHT = 0.07") and new.startswith("INDEXER_LOSS_WEIGHT = ")
    assert "indexer loss weight" in names and "indexer loss keys" not in names  # only lines of that block


def test_a_parents_constants_are_read_never_run(tmp_path):
    marker = tmp_path / "ran"
    attack = f"(__import__('pathlib').Path({str(marker)!r}).write_text('x'),)"
    code = SOURCE.replace("DENSE_UNTIL = 1 / 3", f"DENSE_UNTIL = {attack}")
    code = code.replace("INDEXER_HEADS = 4", "INDEXER_HEADS = 4\nRECENT_SHARE = " + attack)
    for seed in range(20):
        propose_edits(code, random.Random(seed))
    assert not marker.exists()


def test_the_choice_moves_name_knobs_of_the_design():
    assert {knob for _, _, knob, _ in CHOICES} <= set(Design.__dataclass_fields__)


def test_every_knob_is_written_into_one_block_and_each_move_rewrites_only_the_blocks_it_names():
    assert sorted(knob for knobs in KNOBS.values() for knob in knobs) == sorted(Design.__dataclass_fields__)
    owner = {knob: block for block, knobs in KNOBS.items() for knob in knobs}
    for seed in range(20):
        for move, blocks, change in MOVES:
            new = change(Design(), random.Random(seed))
            changed = {f for f in Design.__dataclass_fields__ if getattr(new, f) != getattr(Design(), f)}
            rewritten = {name for name, write in WRITERS.items() if write(new) != write(Design())}
            assert rewritten == {owner[knob] for knob in changed} and rewritten <= set(blocks), move


# ---------------------------------------------------------------------------------------------
# Finer local priors: windows, very small k and recency slopes per layer


def test_a_recency_slope_per_layer_is_written_per_layer_and_read_back(tmp_path):
    design = Design(recency_slope=(0.01, 0.0, 0.0, 0.003))
    code = with_design(SOURCE, design)
    assert "RECENCY_SLOPE = (0.01, 0, 0, 0.003)  # per layer:" in code
    assert read_design(code) == (design, set(WRITERS)) and static_violation(code, SOURCE) is None
    path = tmp_path / "child.py"
    path.write_text(code)
    module = load_program(path)
    assert [module.LightningIndexer(D_MODEL, layer).recency_slope for layer in range(N_LAYERS)] == [0.01, 0, 0, 0.003]
    keeps_every_block_contract(module)


def test_one_slope_for_every_layer_keeps_the_form_older_programs_have():
    code = with_design(SOURCE, Design(recency_slope=0.01))  # a number, as older designs and scripts give it
    assert "RECENCY_SLOPE = 0.01  # index score lost per position between query and key\n" in code
    assert "        return scores - RECENCY_SLOPE * distance\n" in code
    assert read_design(code) == (Design(recency_slope=(0.01,) * N_LAYERS), set(WRITERS))


def test_the_per_layer_moves_reach_fine_windows_and_very_small_k_with_recent_keys():
    move = {name: change for name, _, change in MOVES}
    windows = {
        s
        for seed in range(100)
        for s in move["selection recent keys of one layer"](Design(), random.Random(seed)).recent_share
    }
    assert {0.0625, 0.1875} <= windows
    for seed in range(20):
        d = move["small middle k with recent keys"](Design(), random.Random(seed))
        small = [i for i, k in enumerate(d.schedule()) if k in (L // 32, L // 16)]
        assert small and set(small) <= {1, 2} and all(d.recent_share[i] > 0 for i in small) and _valid(d)
    slopes = move["index score recency of one layer"](Design(), random.Random(0)).recency_slope
    assert len(set(slopes)) == 2 and sum(s > 0 for s in slopes) == 1


# ---------------------------------------------------------------------------------------------
# Crossover, on prompts built as a run builds them (OpenEvolve's sampler, our config and templates)


def prompt_with(parent, top=(), inspirations=()):
    """The user prompt of a run for `parent`, the archive showing `top` and `inspirations`
    ((code, combined_score) each) as OpenEvolve shows them."""
    config = Config.from_yaml(CONFIG)
    as_program = lambda i, code, score: dict(id=f"p{i}", code=code, metrics=dict(METRICS, combined_score=score))
    top = [as_program(i, code, score) for i, (code, score) in enumerate(top)]
    inspirations = [as_program(100 + i, code, score) for i, (code, score) in enumerate(inspirations)]
    return PromptSampler(config.prompt).build_prompt(
        current_program=parent,
        parent_program=parent,
        program_metrics=METRICS,
        previous_programs=top[: config.prompt.num_top_programs],
        top_programs=top,
        inspirations=inspirations,
        language="python",
        evolution_round=3,
        diff_based_evolution=True,
        feature_dimensions=config.database.feature_dimensions,
    )["user"]


def ask(prompt, seed):
    return asyncio.run(OfflineMutator().generate_with_context("", [{"role": "user", "content": prompt}], seed=seed))


def test_crossover_takes_each_knob_from_one_of_the_two_parents_and_names_both():
    a = Design(recent_share=(0.25, 0.0, 0.0, 0.0), head_dim=16)  # the parent: two gains of its branch
    b = Design(recency_slope=(0.0, 0.01, 0.0, 0.0), loss_weight=0.2, k_shares=(1.0, 0.0625, 0.25, 0.5))
    parent, other = with_design(SOURCE, a), with_design(SOURCE, b)
    prompt = prompt_with(parent, top=[(other, 0.0021), (parent, 0.0019)])
    name = f"crossover with Program 1 (score 0.0021, code {hashlib.sha256(other.encode()).hexdigest()[:8]})"
    children = set()
    for seed in range(60):
        response = ask(prompt, seed)
        if "crossover" not in response.splitlines()[0]:
            continue
        assert response.startswith(f"Offline mutator: {name}.\n")  # the second parent, as the prompt names it
        child = apply_diff(parent, response)
        d, known = read_design(child)
        assert known == set(WRITERS) and static_violation(child, SOURCE) is None and _valid(d)
        for field in Design.__dataclass_fields__:
            mine, theirs, got = getattr(a, field), getattr(b, field), getattr(d, field)
            if field in KNOBS["k_schedule"]:
                assert d.schedule() in (a.schedule(), b.schedule())  # the schedule comes whole from one parent
            elif isinstance(got, tuple):
                assert all(g in (m, t) for g, m, t in zip(got, mine, theirs)), field  # layer by layer
            else:
                assert got in (mine, theirs), field
        assert d not in (a, b)  # both parents in it
        children.add(d)
    assert len(children) >= 3


def test_crossover_stacks_windows_found_in_different_layers_by_two_parents():
    a = Design(recent_share=(0.25, 0.0, 0.0, 0.0))
    b = Design(recent_share=(0.0, 0.0, 0.5, 0.0), loss_weight=0.2)
    children = {crossover(a, b, list(WRITERS), random.Random(seed)) for seed in range(30)}
    assert Design(recent_share=(0.25, 0.0, 0.5, 0.0)) in children
    assert Design(recent_share=(0.25, 0.0, 0.5, 0.0), loss_weight=0.2) in children


def test_crossover_is_not_drawn_without_a_second_program_in_the_prompt():
    first = first_prompt(Config.from_yaml(CONFIG), compact=False)["user"]  # the archive: the initial program alone
    hand_tuned = SOURCE.replace("INDEXER_LOSS_WEIGHT = 0.1  #", "INDEXER_LOSS_WEIGHT = 0.07  # tuned by hand,")
    prompts = [
        first,
        prompt_with(SOURCE),
        prompt_with(SOURCE, top=[(hand_tuned, 0.0019)]),  # differs only in a block the mutator cannot read
    ]
    assert [len(other_programs(prompt)) for prompt in prompts] == [1, 0, 1]
    for prompt in prompts:
        for seed in range(60):
            assert "crossover" not in ask(prompt, seed).splitlines()[0]


def test_every_child_of_300_seeded_draws_over_an_archive_passes_the_static_checks_and_stays_readable():
    """Parents and the programs the prompt shows drawn from an archive of chains, as a run's prompts
    show them: crossover children and every move's children pass the static checks and keep a
    schedule that is not one k everywhere; each is a design the mutator can read again."""
    archive = [SOURCE] + [chain(seed, 4)[0] for seed in range(5)]
    names = []
    for seed in range(300):
        parent = archive[seed % 6]
        top = [(archive[(seed + 1) % 6], 0.0021), (archive[(seed + 2) % 6], 0.002), (archive[(seed + 3) % 6], 0.0019)]
        response = ask(prompt_with(parent, top, inspirations=[(archive[(seed + 4) % 6], 0.0017)]), seed)
        child = apply_diff(parent, response)
        design, known = read_design(child)
        assert child != parent and static_violation(child, SOURCE) is None and _valid(design), response.splitlines()[0]
        assert known == set(WRITERS)
        names += response.splitlines()[0].removeprefix("Offline mutator: ").rstrip(".").split(", ")
    crossovers = sum(name.startswith("crossover with") for name in names)
    assert 50 < crossovers < 130  # about 3 children in 10 (CROSSOVER_SHARE) when the prompt shows others
    assert {"Program 1", "Program 2", "Program D1", "Inspiration 1"} <= {
        name.removeprefix("crossover with ").split(" (")[0] for name in names if name.startswith("crossover with")
    }
    assert {
        "index score recency of one layer",
        "selection recent keys of one layer",
        "small middle k with recent keys",
        "schedule per layer",
    } <= set(names)
