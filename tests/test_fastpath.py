"""The training fast paths compute what the plain path computes: packed attention (per example,
bucketed), merged LoRA, the chunked head loss, and the check that turns them off when they do not."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from habit import adapters, allocator, fastpath, models, training
from habit.data import load_examples
from habit.settings import LoraSettings, TrainSettings


@pytest.fixture(scope="module")
def tiny(tiny_model, tiny_roles):
    _, tok, enc = tiny_roles
    return tiny_model, tok, enc


def lora_model(tiny_model, dropout: float = 0.0, seed: int = 0):
    """The tiny base with LoRA whose B is not zero, so every LoRA weight gets a gradient."""
    base, _ = models.load_model(tiny_model, dtype=torch.float32)
    torch.manual_seed(seed)
    model = adapters.attach(base, LoraSettings(dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    model.train()
    return model


def loss_and_grads(model, batch, pad_id, fast):
    loss, n = training.batch_loss(model, batch, pad_id, "cpu", fast)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), n, grads


def assert_same(a, b, tol=1e-4):
    (la, na, ga), (lb, nb, gb) = a, b
    assert na == nb
    assert la == pytest.approx(lb, rel=tol)
    assert ga.keys() == gb.keys() and ga
    for name in ga:  # fp32 sums in another order: compare each gradient as a whole
        assert float((ga[name] - gb[name]).norm() / gb[name].norm()) < tol, name


def packed_batch(enc, width=512):
    batch = training.plan_epoch(enc, width, 2 * width, seed=0, epoch=0)[0]
    assert len(batch.rows) == 2 and len(batch.rows[0]) >= 3, "the test needs rows of several examples"
    return batch


# --- buckets -------------------------------------------------------------------------------------

def test_buckets_cover_every_example_once_and_are_optimal():
    lengths = [5, 40, 7, 33, 8, 9, 41, 6]
    groups = fastpath.buckets(lengths, most=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert len(groups) <= 3

    def cost(gs):
        return sum(len(g) * max(lengths[i] for i in g) ** 2 for g in gs)

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = min(cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),)) if a < b])
               for k in range(3) for cuts in itertools.combinations(range(1, len(order)), k))
    assert cost(groups) == best
    assert fastpath.buckets([7], most=4) == [[0]]


# --- packed attention ----------------------------------------------------------------------------

LONG = pytest.mark.parametrize("matmul_max", [1024, 4], ids=["matmul", "chunked-for-long"])


def long_buckets(monkeypatch, matmul_max: int) -> None:
    """Buckets longer than `matmul_max` take the chunked path, in chunks of 3 queries (many per
    example, with the causal edge and the window's start inside chunks)."""
    monkeypatch.setattr(fastpath.attention, "MATMUL_ATTENTION_MAX", matmul_max)
    monkeypatch.setattr(fastpath.attention, "QUERY_CHUNK", 3)


@LONG
def test_packed_attention_logits_equal_per_example_logits(tiny, matmul_max, monkeypatch):
    long_buckets(monkeypatch, matmul_max)
    tiny_model, tok, enc = tiny
    model, _ = models.load_model(tiny_model, dtype=torch.float32)
    assert fastpath.use_packed_attention(model)
    batch = packed_batch(enc)
    ids, pos, _, _, _ = training.tensors(batch, tok.pad_token_id)
    packing = fastpath.Packing([[len(e) for e in row] for row in batch.rows], batch.width)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False, habit_packing=packing).logits
        for b, row in enumerate(batch.rows):
            start = 0
            for ex in row:
                alone = model(input_ids=torch.tensor([ex.ids]), use_cache=False).logits[0]
                torch.testing.assert_close(packed[b, start : start + len(ex)], alone, atol=1e-4, rtol=1e-4)
                start += len(ex)


def with_system_prompt(enc, tok, text="Be terse."):
    """The examples as a chat template with a system prompt renders them: a shared prefix."""
    from habit.render import Encoded

    head = tuple(tok(text, add_special_tokens=False).input_ids)
    return [Encoded(head + e.ids, (False,) * len(head) + e.loss, e.where) for e in enc]


def test_shared_prefix_stops_before_the_first_difference_and_the_first_target():
    from habit.render import Encoded

    def ex(ids, first_target):
        return Encoded(tuple(ids), tuple(i >= first_target for i in range(len(ids))))

    common = list(range(10, 20))
    # ten common ids; the last common one must stay with each example (it predicts its own next)
    assert fastpath.shared_prefix([ex(common + [1, 2], 11), ex(common + [3, 4], 11)]) == 9
    # a target inside the common ids ends the prefix before it
    assert fastpath.shared_prefix([ex(common + [1, 2], 6), ex(common + [3, 4], 11)]) == 5
    assert fastpath.shared_prefix([ex(common[:3] + [1, 2], 4), ex(common[:3] + [3], 4)]) == 0  # too short
    assert fastpath.shared_prefix([ex(common + [1], 10)]) == 0  # one example shares with nobody


@LONG
def test_a_shared_prefix_gives_the_per_example_logits(tiny, matmul_max, monkeypatch):
    """The prefix computed once at the start of row 0, every example attending to it: the logits
    of each example's own tokens equal those of the example run whole, alone."""
    long_buckets(monkeypatch, matmul_max)
    tiny_model, tok, enc = tiny
    enc = with_system_prompt(enc, tok)
    prefix = fastpath.shared_prefix(enc)
    assert prefix >= fastpath.MIN_SHARED_PREFIX
    model, _ = models.load_model(tiny_model, dtype=torch.float32)
    assert fastpath.use_packed_attention(model)
    batch = packed_batch(enc)
    ids, pos, _, _, lengths = training.tensors(batch, tok.pad_token_id, prefix)
    packing = fastpath.Packing(lengths, batch.width, prefix=prefix)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False, habit_packing=packing).logits
        first = model(input_ids=torch.tensor([batch.rows[0][0].ids]), use_cache=False).logits[0]
        torch.testing.assert_close(packed[0, :prefix], first[:prefix], atol=1e-4, rtol=1e-4)
        for b, row in enumerate(batch.rows):
            start = prefix if b == 0 else 0
            for ex in row:
                alone = model(input_ids=torch.tensor([ex.ids]), use_cache=False).logits[0]
                own = len(ex) - prefix
                torch.testing.assert_close(packed[b, start : start + own], alone[prefix:], atol=1e-4, rtol=1e-4)
                start += own


@LONG
def test_a_shared_prefix_gives_the_plain_loss_and_gradients(tiny, matmul_max, monkeypatch):
    long_buckets(monkeypatch, matmul_max)
    tiny_model, tok, enc = tiny
    enc = with_system_prompt(enc, tok)
    model = lora_model(tiny_model)
    fast = dataclasses.replace(fastpath.setup(model), prefix=fastpath.shared_prefix(enc))
    assert f"shared prefix ({fast.prefix} tokens)" in fast.names()
    batch = packed_batch(enc)
    plain = loss_and_grads(model, batch, tok.pad_token_id, None)
    assert_same(loss_and_grads(model, batch, tok.pad_token_id, fast), plain)
    only = fastpath.FastPaths(attention=True, prefix=fast.prefix)
    assert_same(loss_and_grads(model, batch, tok.pad_token_id, only), plain)


@LONG
def test_packed_attention_respects_a_sliding_window(matmul_max, monkeypatch):
    """Gemma 3 mixes sliding-window and full layers; spans longer than the window get its mask."""
    long_buckets(monkeypatch, matmul_max)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=128, attn_implementation="sdpa")
    model = Gemma3ForCausalLM(config).eval()
    assert fastpath.use_packed_attention(model)
    lengths = [[12, 3, 9], [20]]
    width = 24
    seqs = [[torch.randint(1, 97, (n,)) for n in row] for row in lengths]
    ids = torch.zeros(2, width, dtype=torch.long)
    pos = torch.zeros(2, width, dtype=torch.long)
    for b, row in enumerate(seqs):
        t = 0
        for s in row:
            ids[b, t : t + len(s)], pos[b, t : t + len(s)] = s, torch.arange(len(s))
            t += len(s)
        pos[b, t:] = torch.arange(width - t)
    packing = fastpath.Packing(lengths, width)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False, habit_packing=packing).logits
        for b, row in enumerate(seqs):
            t = 0
            for s in row:
                alone = model(input_ids=s[None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[b, t : t + len(s)], alone, atol=1e-4, rtol=1e-4)
                t += len(s)


def test_without_packing_the_attention_is_plain_sdpa(tiny):
    """Generation passes no packing: the registered implementation must behave as sdpa, masks included."""
    tiny_model, tok, _ = tiny
    plain, _ = models.load_model(tiny_model, dtype=torch.float32)
    fast, _ = models.load_model(tiny_model, dtype=torch.float32)
    assert fastpath.use_packed_attention(fast)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits,
                                   plain(input_ids=ids, attention_mask=mask).logits)


def test_long_examples_chunked_give_the_plain_loss_and_gradients(tiny, monkeypatch):
    """Every bucket through the chunked path, its scores recomputed in the backward."""
    long_buckets(monkeypatch, 4)
    tiny_model, tok, enc = tiny
    model = lora_model(tiny_model)
    batch = packed_batch(enc)
    plain = loss_and_grads(model, batch, tok.pad_token_id, None)
    assert_same(loss_and_grads(model, batch, tok.pad_token_id, fastpath.FastPaths(attention=True)), plain)


def test_chunked_attention_holds_one_chunk_of_scores_at_a_time():
    """What the backward keeps: the inputs, not the L² scores (checkpointed chunks)."""
    torch.manual_seed(0)
    n, heads, kv, length, dim = 1, 4, 2, 96, 8
    q = torch.randn(n, heads, length, dim, requires_grad=True)
    k, v = (torch.randn(n, kv, length, dim, requires_grad=True) for _ in range(2))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fastpath.attention.chunked_attention(q, k, v, 0, None, dim**-0.5)
    assert max(saved) < heads * length * length // 4  # no score matrix of the whole example
    rep = torch.repeat_interleave
    want = F.scaled_dot_product_attention(q, rep(k, 2, dim=1), rep(v, 2, dim=1), is_causal=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# --- merged LoRA and the head loss, against the plain path ---------------------------------------

def test_each_fast_path_matches_the_plain_path_in_loss_and_every_lora_gradient(tiny):
    tiny_model, tok, enc = tiny
    model = lora_model(tiny_model)
    fast = fastpath.setup(model)
    assert fast.names() == ["packed attention", "merged LoRA", "chunked head loss", "fused RMSNorm"]
    batch = packed_batch(enc)
    plain = loss_and_grads(model, batch, tok.pad_token_id, None)
    for paths in (fastpath.FastPaths(attention=True), fastpath.FastPaths(lora=fast.lora),
                  fastpath.FastPaths(head=fast.head), fastpath.FastPaths(norms=fast.norms), fast):
        assert_same(loss_and_grads(model, batch, tok.pad_token_id, paths), plain)


def test_merged_weights_kept_through_a_step_give_the_same_gradients(tiny):
    tiny_model, tok, enc = tiny
    model = lora_model(tiny_model)
    fast = fastpath.setup(model)
    batch = packed_batch(enc)
    plain = loss_and_grads(model, batch, tok.pad_token_id, fast)
    with fast.fixed_weights():
        kept = loss_and_grads(model, batch, tok.pad_token_id, fast)
        assert len(fast.kept) == len(fast.lora)  # one merged weight per layer, made once
        assert all("w" in kept_one for kept_one in fast.kept.values())
        again = loss_and_grads(model, batch, tok.pad_token_id, fast)
    assert fast.kept is None  # an optimizer step after the context must not see stale weights
    assert_same(kept, plain)
    assert_same(again, plain)


def test_merged_lora_leaves_dropout_and_eval_to_peft(tiny):
    tiny_model, tok, enc = tiny
    model = lora_model(tiny_model, dropout=0.5)
    layers = fastpath.lora_layers(model)
    x = torch.randn(3, 32)
    layer = next(m for m in layers if m.base_layer.in_features == 32)
    with fastpath.merged_lora(layers):
        torch.manual_seed(1)
        fast_out = layer(x)
    torch.manual_seed(1)
    torch.testing.assert_close(fast_out, layer(x))  # same dropout mask: PEFT's own forward ran
    assert "forward" not in layer.__dict__  # the override is gone after the context


def test_merged_lora_binds_one_function_to_every_layer(tiny):
    """torch.compile traces one decoder layer's code for all of them only if every layer calls the
    same function: a closure per layer made it recompile per layer."""
    tiny_model, _, _ = tiny
    layers = fastpath.lora_layers(lora_model(tiny_model))
    with fastpath.merged_lora(layers, kept={}):
        assert {layer.forward.__func__ for layer in layers} == {fastpath.lora._fast_forward}
        assert all(layer.__dict__["_habit_kept"] == {} for layer in layers)  # state on the layer
    assert not any("_habit_kept" in layer.__dict__ for layer in layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_norm_gives_the_model_norms_output_and_input_gradient(tiny, dtype):
    """Against the model's own RMSNorm forward and autograd's backward of it: the same output
    (bit for bit: the same operations) and the same input gradient (up to fp32 rounding)."""
    tiny_model, _, _ = tiny
    model = lora_model(tiny_model)
    norms = fastpath.norm_layers(model)
    assert len(norms) == 2 * model.config.num_hidden_layers + 1  # two a layer and the final one
    norm = norms[0]
    norm.weight.data.normal_(1, 0.2)  # not all ones, so a dropped weight shows
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 7, norm.weight.shape[0])).to(dtype).requires_grad_(True)
    dy = torch.randn(2, 7, norm.weight.shape[0]).to(dtype)
    weight = norm.weight.data.clone()
    try:
        norm.weight.data = weight.to(dtype)
        own = norm(x)
        (own_dx,) = torch.autograd.grad(own, x, dy)
        with fastpath.fused_norms(norms):
            fused = norm(x)
            (fused_dx,) = torch.autograd.grad(fused, x, dy)
            assert fused.grad_fn.name().endswith("RMSNormBackward")  # the fused path ran
    finally:
        norm.weight.data = weight
    assert torch.equal(fused, own)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert float((fused_dx.float() - own_dx.float()).norm() / own_dx.float().norm()) < tol
    assert "forward" not in norm.__dict__  # put back on the way out


def test_the_fused_norm_is_only_for_frozen_norms_of_the_known_form(tiny):
    tiny_model, _, _ = tiny
    model = lora_model(tiny_model)
    norms = fastpath.norm_layers(model)
    norms[0].weight.requires_grad_(True)  # a trained norm keeps the model's own
    assert norms[0] not in fastpath.norm_layers(model)

    class GemmaRMSNorm(torch.nn.Module):  # (1 + w) in fp32: not the form the fused norm computes
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
            self.variance_epsilon = 1e-6

    assert fastpath.norm_layers(torch.nn.Sequential(GemmaRMSNorm())) == ()


def test_head_loss_equals_cross_entropy_across_chunks():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    targets = torch.randint(0, 50, (37,))
    expected = F.cross_entropy(head(hidden), targets, reduction="sum")
    (want,) = torch.autograd.grad(expected * 0.5, hidden)
    with fastpath.head_loss(head, targets, chunk=8):
        got = head(hidden)
    (grad,) = torch.autograd.grad(got * 0.5, hidden)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, want)
    with torch.no_grad(), fastpath.head_loss(head, targets, chunk=8):
        torch.testing.assert_close(head(hidden), expected)
    assert "forward" not in head.__dict__


def test_head_loss_in_bf16_matches_an_fp32_cross_entropy_of_the_same_logits():
    """The head loss keeps bf16 logits in bf16 (no fp32 copy of the vocabulary-wide rows): its loss
    must still match the fp32 log-softmax of those logits, and its gradient the bf16 plain path's."""
    torch.manual_seed(0)
    hidden = torch.randn(300, 64).bfloat16().requires_grad_()
    head = torch.nn.Linear(64, 4096, bias=False).bfloat16().requires_grad_(False)
    targets = torch.randint(0, 4096, (300,))
    targets[:100] = head(hidden[:100]).argmax(-1)  # confident rows, where p − 1 needs precision
    expected = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (want,) = torch.autograd.grad(expected, hidden)
    with fastpath.head_loss(head, targets, chunk=128):
        got = head(hidden)
    (grad,) = torch.autograd.grad(got, hidden)
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    assert float((grad.float() - want.float()).norm() / want.float().norm()) < 1e-2


# --- the check ----------------------------------------------------------------------------------

def test_check_turns_the_head_loss_off_for_a_head_that_post_processes_logits(tiny):
    """Gemma 2 and 3 can softcap logits after the lm_head: the head loss would skip that, so it must
    fail the check, while packed attention and merged LoRA pass it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    _, tok, enc = tiny
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              final_logit_softcapping=0.5, attn_implementation="sdpa",
                              pad_token_id=tok.pad_token_id)
    model = adapters.attach(Gemma3ForCausalLM(config), LoraSettings())
    model.train()
    fast = fastpath.setup(model)
    batch = packed_batch(enc)
    ok, diff = training.check_fast(model, batch, tok.pad_token_id, torch.device("cpu"), fast)
    assert not ok and diff > 0.01
    rest = fastpath.FastPaths(attention=fast.attention, lora=fast.lora)
    assert training.check_fast(model, batch, tok.pad_token_id, torch.device("cpu"), rest)[0]


def test_training_records_its_fast_paths_and_matches_the_plain_path(tiny_model, roles_csv, tmp_path):
    table = load_examples(roles_csv)
    settings = dict(steps=3, batch_tokens=512, max_len=256, micro_tokens=256, precision="fp32", val_frac=0.2)
    fast = training.train(table, tmp_path / "fast", model=tiny_model, settings=TrainSettings(**settings))
    plain = training.train(table, tmp_path / "plain", model=tiny_model,
                           settings=TrainSettings(**settings, plain_path=True))
    info = json.loads((tmp_path / "fast" / "run.json").read_text())
    assert info["plan"]["fast_paths"] == ["packed attention", "merged LoRA", "chunked head loss", "fused RMSNorm"]
    assert info["plan"]["fast_check"] < 1e-3
    assert info["plan"]["malloc"] == allocator.describe()  # recorded for whoever compares runs
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["plan"]["fast_paths"] == []
    assert fast.train_loss == pytest.approx(plain.train_loss, rel=1e-4)
    assert fast.val_loss == pytest.approx(plain.val_loss, rel=1e-4)


def test_passes_split_a_batch_into_whole_rows(tiny):
    _, _, enc = tiny
    batch = training.plan_epoch(enc, 128, 1024, seed=0, epoch=0)[0]
    parts = training.passes(batch, 300)  # two rows of 128 a pass
    assert [len(p.rows) for p in parts][:-1] == [2] * (len(parts) - 1)
    assert sum((p.rows for p in parts), ()) == batch.rows
    assert [len(p.rows) for p in training.passes(batch, 10)] == [1] * len(batch.rows)  # at least a row


def test_a_failed_check_trains_the_plain_path_and_says_so(tiny_model, roles_csv, tmp_path, monkeypatch, capsys):
    from habit import cli

    monkeypatch.setattr(training, "check_fast", lambda *a: (False, 0.5))
    out = tmp_path / "run"
    assert cli.main(["train", roles_csv, "--model", tiny_model, "--out", str(out), "--steps", "2",
                     "--max-len", "256", "--batch-tokens", "512"]) == 0
    assert "fast paths off" in capsys.readouterr().err
    plan = json.loads((out / "run.json").read_text())["plan"]
    assert plan["fast_paths"] == [] and plan["fast_check"] == 0.5


def test_fast_paths_match_on_a_model_with_biased_projections(tiny):
    """Qwen2 puts biases on q/k/v: the merged LoRA forward must add them (and leave them frozen)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tok, enc = tiny
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         attn_implementation="sdpa", pad_token_id=tok.pad_token_id)
    base = Qwen2ForCausalLM(config)
    assert base.model.layers[0].self_attn.q_proj.bias is not None
    model = adapters.attach(base, LoraSettings())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    model.train()
    fast = fastpath.setup(model)
    assert fast.names() == ["packed attention", "merged LoRA", "chunked head loss", "fused RMSNorm"]
    batch = packed_batch(enc)
    assert_same(loss_and_grads(model, batch, tok.pad_token_id, fast),
                loss_and_grads(model, batch, tok.pad_token_id, None))


def test_training_on_chats_with_one_system_prompt_shares_it_and_matches_the_plain_path(tiny_model, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "You are the keeper of a lonely lighthouse."},
                          {"role": "user", "content": f"Question {i}: what of the sea tonight?"},
                          {"role": "assistant", "content": f"Calm water, light wind from the north {i}."}]}
            for i in range(12)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = load_examples(data)
    settings = dict(steps=3, batch_tokens=512, max_len=256, micro_tokens=256, precision="fp32", val_frac=0.2)
    fast = training.train(table, tmp_path / "fast", model=tiny_model, settings=TrainSettings(**settings))
    plain = training.train(table, tmp_path / "plain", model=tiny_model,
                           settings=TrainSettings(**settings, plain_path=True))
    paths = json.loads((tmp_path / "fast" / "run.json").read_text())["plan"]["fast_paths"]
    assert any(p.startswith("shared prefix (") for p in paths), paths
    assert fast.train_loss == pytest.approx(plain.train_loss, rel=1e-4)
    assert fast.val_loss == pytest.approx(plain.val_loss, rel=1e-4)
    logged = [json.loads(line) for line in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "tokens_computed" in r][-1]
    assert last["tokens_computed"] < last["tokens"]  # the system prompt ran once a pass



def test_the_check_catches_a_wrong_merge(tiny_model, roles_csv, tmp_path, monkeypatch, capsys):
    """With a fresh adapter (B = 0) a merge that scales B·A wrongly equals W on both paths; the
    check sets B non-zero first, so it must see the error and train the plain path, saying so."""
    from habit import cli

    real = fastpath.lora._merged
    monkeypatch.setattr(fastpath.lora, "_merged", lambda w, a, b, scale: real(w, a, b, 2 * scale))
    out = tmp_path / "run"
    assert cli.main(["train", roles_csv, "--model", tiny_model, "--out", str(out), "--steps", "1",
                     "--max-len", "256", "--batch-tokens", "512", "--precision", "fp32"]) == 0
    assert "fast paths off" in capsys.readouterr().err
    plan = json.loads((out / "run.json").read_text())["plan"]
    assert plan["fast_paths"] == [] and plan["fast_check"] > 1e-3


def test_the_check_catches_a_wrong_lora_a_gradient(tiny, monkeypatch):
    """A's gradient is zero on both paths while B = 0: only the perturbed check can see it wrong."""
    tiny_model, tok, enc = tiny
    base, _ = models.load_model(tiny_model, dtype=torch.float32)
    model = adapters.attach(base, LoraSettings())  # fresh: every B is zero
    model.train()
    fast = fastpath.setup(model)
    batch = packed_batch(enc)
    assert training.check_fast(model, batch, tok.pad_token_id, torch.device("cpu"), fast)[0]
    right = fastpath.lora._lora_function()

    class WrongA(right):
        @staticmethod
        def backward(ctx, dy):
            dx, w, bias, d_a, d_b, scale, merged = right.backward(ctx, dy)
            return dx, w, bias, 2 * d_a, d_b, scale, merged

    monkeypatch.setattr(fastpath.lora, "_MERGED_LORA", WrongA)
    ok, diff = training.check_fast(model, batch, tok.pad_token_id, torch.device("cpu"), fast)
    assert not ok and diff > 1e-3
    assert all(float(p.detach().abs().max()) == 0 for n, p in model.named_parameters() if "lora_B" in n)  # restored


def test_device_selection_keeps_cpu_paths_off_a_gpu(tiny_model, monkeypatch):
    """The CPU-measured fast paths (packed attention, merged LoRA) stay off on CUDA; the chunked
    head loss (a memory saving) stays on; flash-attention is chosen only on CUDA, in a half
    dtype, when installed."""
    import importlib.util

    import torch

    from habit import adapters, models
    from habit.settings import LoraSettings

    model, _ = models.load_model(tiny_model, dtype=torch.float32)
    model = adapters.attach(model, LoraSettings())
    gpu = fastpath.setup(model, "cuda")
    assert not gpu.attention and not gpu.lora and gpu.head is not None
    assert model.config._attn_implementation == "sdpa"  # setup on cuda registered nothing
    cpu = fastpath.setup(model, "cpu")
    assert cpu.attention and cpu.lora and cpu.head is not None

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert models.attention_for("cuda:0", torch.bfloat16) == "flash_attention_2"
    assert models.attention_for("cuda", torch.float32) == "sdpa"
    assert models.attention_for("cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert models.attention_for("cuda", torch.bfloat16) == "sdpa"
