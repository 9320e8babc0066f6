"""The initial PLASA program: the formula, causality, selection, schedule, size, training signal."""

import json
import subprocess
import sys

import pytest
import torch

from plasa_lab import INITIAL_PROGRAM
from plasa_lab.contract import VOCAB_SIZE
from plasa_lab.evaluation.sandboxed.probes import (
    batch_violation,
    causality_violation,
    local_forward,
    probe,
    probe_model,
)
from plasa_lab.program.blocks import SCHEDULE_RULES, load_program, with_schedule

SCHEDULE_NAMES = list(SCHEDULE_RULES)
SOURCE = INITIAL_PROGRAM.read_text()


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """The initial program with each named schedule, as modules."""
    folder = tmp_path_factory.mktemp("schedules")
    modules = {}
    for name in SCHEDULE_NAMES:
        (folder / f"{name}.py").write_text(with_schedule(SOURCE, name))
        modules[name] = load_program(folder / f"{name}.py")
    return modules


def build(module, seed=0):
    torch.manual_seed(seed)
    return module.build_model().eval()


def test_index_score_matches_naive_loop(program, monkeypatch):
    torch.manual_seed(1)
    monkeypatch.setattr(program, "INDEXER_HEADS", 3)
    monkeypatch.setattr(program, "INDEXER_HEAD_DIM", 5)
    indexer = program.LightningIndexer(d_model=16, layer=0)
    for p in indexer.parameters():
        torch.nn.init.normal_(p)  # large random weights: most ReLUs active, some not
    x = torch.randn(2, 7, 16)
    q, k, w = indexer.components(x)
    expected = torch.zeros(2, 7, 7)
    for b in range(2):
        for t in range(7):
            for s in range(7):
                expected[b, t, s] = sum(w[b, t, j] * torch.relu(q[b, t, j] @ k[b, s]) for j in range(3))
    assert torch.allclose(indexer(x), expected, atol=1e-5)
    assert (expected == 0).any() and (expected != 0).any()


def test_indexer_has_four_heads_of_32_and_one_shared_key(program):
    indexer = build(program).plasa_layers()[0].indexer
    q, k, w = indexer.components(torch.randn(1, 5, 128))
    assert q.shape == (1, 5, 4, 32) and k.shape == (1, 5, 32) and w.shape == (1, 5, 4)


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_changing_future_tokens_leaves_past_logits_unchanged(programs, schedule, random_tokens):
    forward = local_forward(build(programs[schedule]))
    assert causality_violation(forward, random_tokens, [0, 1, 17, 31, 63, 100, 126], VOCAB_SIZE) is None


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_behavioural_probe_passes(programs, schedule, random_tokens):
    assert probe_model(build(programs[schedule]), random_tokens, VOCAB_SIZE) is None


def test_the_probes_ask_for_logits_on_their_first_pass_only(program, random_tokens):
    """The judge's trunk is fixed code, so after the first pass equal selections mean equal logits: a
    probe asks for logits once, and passes on selections alone when the forward gives no more."""
    model = build(program)
    forward, asked = local_forward(model), []

    def judge_like(tokens, logits=True):
        asked.append(logits)
        out = forward(tokens)
        return (out[0] if logits else None), out[1]

    assert probe(judge_like, [layer.k for layer in model.plasa_layers()], random_tokens, VOCAB_SIZE) is None
    assert asked[0] is True and len(asked) > 5 and not any(asked[1:])


def test_a_model_in_this_process_is_also_checked_by_its_logits(program, random_tokens):
    """Where the forward is not the fixed trunk (a model in this process), a leak that shows only in
    the logits, with causal selections, is caught: into the past, and across the batch."""
    forward = local_forward(build(program))

    def peeking(tokens, logits=True):
        out, selections = forward(tokens)
        out[:, :-1, 0] += tokens[:, 1:].float()  # the next token, written into each position's logits
        return out, selections

    def mixing(tokens, logits=True):
        out, selections = forward(tokens)
        return out + out.mean(0, keepdim=True), selections

    assert "moved the logits at position" in causality_violation(peeking, random_tokens, [17, 63], VOCAB_SIZE)
    base = mixing(random_tokens)
    assert "changed the logits" in batch_violation(mixing, random_tokens, VOCAB_SIZE, base)


def test_selector_without_causal_and_is_caught_by_causality_check(tmp_path, random_tokens):
    leaky = SOURCE.replace("    return selected & causal\n", "    return selected\n")
    assert leaky != SOURCE
    (tmp_path / "leaky.py").write_text(leaky)
    model = build(load_program(tmp_path / "leaky.py"))
    failure = causality_violation(local_forward(model), random_tokens, [0, 17, 63], VOCAB_SIZE)
    assert failure is not None and "future tokens" in failure
    assert "selects key" in probe_model(model, random_tokens, VOCAB_SIZE)


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_selection_is_causal_and_keeps_min_k_t_plus_1_keys_per_query(programs, schedule, random_tokens):
    model = build(programs[schedule])
    with torch.no_grad():
        model(random_tokens)
    T = random_tokens.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in model.plasa_layers():
        sel = layer.last_selection
        assert sel.dtype == torch.bool and sel.shape == (2, T, T)
        assert not (sel & ~causal).any()
        expected = torch.arange(1, T + 1).clamp(max=layer.k).expand(2, T)
        assert torch.equal(sel.sum(-1), expected)


def test_sparse_layer_keeps_the_highest_scoring_past_keys(program):
    scores = torch.tensor([[[5.0, 0, 0, 0], [1, 3, 9, 9], [2, 1, 3, 9], [4, 1, 3, 2]]])
    selected = program.select_topk(scores, 2, layer=1)
    assert selected.tolist() == [
        [
            [True, False, False, False],
            [True, True, False, False],
            [True, False, True, False],
            [True, False, True, False],
        ]
    ]


def test_progressive_schedule_is_128_32_32_64(program):
    assert program.layer_k_schedule(4, 128) == [128, 32, 32, 64]
    assert [layer.k for layer in build(program).plasa_layers()] == [128, 32, 32, 64]


@pytest.mark.parametrize(
    "schedule, ks",
    [
        ("AGGRESSIVE_MIDDLE", [128, 16, 16, 64]),
        ("DENSE_TO_SPARSE", [128, 64, 32, 16]),
        ("UNIFORM", [64, 64, 64, 64]),
        ("DENSE", [128, 128, 128, 128]),
    ],
)
def test_named_schedules(programs, schedule, ks):
    assert [layer.k for layer in build(programs[schedule]).plasa_layers()] == ks


def test_every_block_function_learns_which_layer_it_serves(program, monkeypatch):
    seen = []
    select = program.select_topk
    monkeypatch.setattr(program, "select_topk", lambda scores, k, layer: seen.append(layer) or select(scores, k, layer))
    model = build(program)
    model(torch.zeros(1, 8, dtype=torch.long))
    assert seen == [0, 1, 2, 3]


def test_model_config_is_the_benchmark_model(program):
    assert program.MODEL_CONFIG == dict(n_layers=4, d_model=128, n_heads=4, seq_len=128, vocab_size=49152, dropout=0.1)


def test_nonembedding_parameters_about_1_5M_with_untied_embedding(program):
    model = build(program)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel() + model.lm_head.weight.numel()
    assert model.embed.weight.data_ptr() != model.lm_head.weight.data_ptr()
    assert 1_400_000 <= total - embedding <= 1_600_000


def test_output_is_logits_and_aux_loss_in_training_only(program, random_tokens):
    model = build(program).train()
    out = model(random_tokens)
    assert out["logits"].shape == (2, 128, VOCAB_SIZE)
    assert out["aux_loss"].ndim == 0 and torch.isfinite(out["aux_loss"]) and out["aux_loss"] > 0
    assert "aux_loss" not in model.eval()(random_tokens)


def test_indexer_learns_from_aux_loss_alone(program, random_tokens):
    model = build(program).train()
    out = model(random_tokens)
    lm_loss = torch.nn.functional.cross_entropy(out["logits"][:, :-1].flatten(0, 1), random_tokens[:, 1:].flatten())
    indexer_params = [p for layer in model.plasa_layers() for p in layer.indexer.parameters()]
    lm_grads = torch.autograd.grad(lm_loss, indexer_params, retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in lm_grads)  # top-k passes no gradient
    aux_grads = torch.autograd.grad(out["aux_loss"], indexer_params)
    for layer_grads in zip(*[iter(aux_grads)] * 3):  # q, k, w of each layer
        assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in layer_grads)


def test_aux_loss_is_zero_when_index_scores_match_attention(program):
    attn = torch.softmax(torch.randn(1, 4, 6, 6).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -1e9), -1)
    selected = torch.ones(1, 6, 6, dtype=torch.bool).tril()
    p = attn.sum(1) / attn.sum(1).sum(-1, keepdim=True)
    assert program.indexer_aux_loss(attn, p.log(), selected, layer=0).abs() < 1e-5
    assert program.indexer_aux_loss(attn, torch.zeros(1, 6, 6), selected, layer=0) > 1e-3


def test_running_program_alone_trains_on_synthetic_tokens():
    run = subprocess.run(
        [sys.executable, str(INITIAL_PROGRAM), "--steps", "3"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    metrics = json.loads(run.stdout.strip().splitlines()[-1])
    assert metrics["k_schedule"] == [128, 32, 32, 64] and metrics["val_loss"] > 0


def test_running_program_alone_reads_a_token_file(tmp_path):
    tokens = torch.randint(0, VOCAB_SIZE, (5000,), dtype=torch.int32).to(torch.uint16)
    (tmp_path / "t.bin").write_bytes(tokens.numpy().tobytes())
    run = subprocess.run(
        [sys.executable, str(INITIAL_PROGRAM), "--tokens", str(tmp_path / "t.bin"), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["train_loss"] > 0


def test_running_program_alone_on_too_few_tokens_fails_with_one_line(tmp_path):
    (tmp_path / "t.bin").write_bytes(b"\x01\x00" * 10)
    run = subprocess.run(
        [sys.executable, str(INITIAL_PROGRAM), "--tokens", str(tmp_path / "t.bin")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "need at least" in run.stderr
