"""The offline mutator: structural moves that stay inside the blocks, pass the static checks and
keep every block's contract at run time, line moves for blocks an LLM rewrote, and a parent's text
that is read, never run."""

import random

import pytest
import torch
from openevolve.utils.code_utils import apply_diff, extract_diffs

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.program.blocks import load_program, split_blocks
from plasa_lab.program.checks import static_violation
from plasa_lab.search.mutator import (
    CHOICES,
    MOVES,
    WRITERS,
    Design,
    format_diff,
    propose_edits,
    read_design,
    with_design,
)

SOURCE = INITIAL_PROGRAM.read_text()
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
        assert diff.startswith(f"Offline mutator: {', '.join(e[0] for e in edits)}.")
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
