"""The decoder-only Transformer, its tokenisers and `wm gen train-text` / `sample-text`."""

import random
from pathlib import Path

import pytest
import torch

from gen_core.checkpoint import latest_checkpoint, load_checkpoint
from gen_core.config import load_config
from gen_core.errors import UserError
from gen_core.tokenizers import ByteTokenizer, CharTokenizer, tokenizer_from_dict
from gen_core.transformer import (
    KVCache,
    Transformer,
    TransformerConfig,
    apply_rotary,
    rotary_tables,
)
from worldmodels.cli import main
from worldmodels.gen.text import SampleTextConfig, TrainTextConfig, get_lr

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return Transformer(TransformerConfig(**{**cfg, **kw}))


def sharp(model: Transformer) -> Transformer:
    """Large random weights: peaked next-token distributions that depend on the whole context,
    so that a sampler attending to the wrong positions picks different tokens (at the small
    initialisation every distribution is nearly uniform and such a bug would go unseen)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def test_shapes_loss_and_weight_tying():
    model = tiny()
    idx = torch.randint(0, 11, (3, 8))
    logits, loss = model(idx)
    assert logits.shape == (3, 8, 11) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    # an untrained model predicts about uniformly: loss near ln(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(11.0)).item()) < 0.3
    assert model.transformer.wte.weight is model.lm_head.weight
    with pytest.raises(ValueError, match="context window"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_changing_a_future_token_never_changes_an_earlier_output():
    model = tiny().eval()
    idx = torch.randint(0, 11, (2, 8))
    base, _ = model(idx)
    for t in range(8):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 11
        out, _ = model(changed)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("rotary", [False, True])
def test_cached_forward_equals_full_forward(rotary):
    model = sharp(tiny(rotary=rotary)).double().eval()
    idx = torch.randint(0, 11, (2, 8))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, idx.device, torch.float64)
    parts = [model(idx[:, :3], cache=cache)[0]]  # prefill
    parts.append(model(idx[:, 3:4], cache=cache)[0])  # one token
    parts.append(model(idx[:, 4:8], cache=cache)[0])  # several tokens after cached ones
    assert cache.length == 8
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.8, 3), (0.0, None)])
def test_kv_cache_sampler_gives_the_same_tokens_as_recomputation(temperature, top_k, rotary):
    # float64 so that rounding differences between the two paths cannot flip a sampled token;
    # 30 new tokens after a 3-token prompt run well past the 8-token context window
    model = sharp(tiny(rotary=rotary)).double()
    prompt = torch.randint(0, 11, (2, 3))
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(123)
        outs.append(
            model.generate(prompt, 30, temperature, top_k, generator=gen, use_cache=use_cache)
        )
    assert outs[0].shape == (2, 33)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :3], prompt)
    assert model.training  # generate restores the mode it found


def test_rotary_ring_cache_reads_a_long_text_as_the_sliding_window_does():
    """Past the window, rotary keys go into a ring of block_size slots; one position at a time,
    that gives every output of the banded full pass (each position over its last 8)."""
    model = sharp(tiny(rotary=True)).double().eval()
    idx = torch.randint(0, 11, (2, 30))
    full, _ = model(idx)  # (2, 30, 11): banded, no cache
    cache = KVCache(model.config, 2, idx.device, torch.float64)
    steps = [model(idx[:, :8], cache=cache)[0]]
    steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(8, 30)]
    assert cache.length == 30 and cache.k[0].shape[2] == 8  # 30 positions, 8 slots
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-12)
    # the band is real: the first token still matters at position 14 (2 layers x 7 back) ...
    changed = idx.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 11
    out, _ = model(changed)
    assert not torch.allclose(out[:, 14], full[:, 14])
    torch.testing.assert_close(out[:, 15:], full[:, 15:], rtol=0, atol=0)  # ... and not after
    with pytest.raises(ValueError, match="context window"):  # several at once past the window
        model(idx[:, :2], cache=cache)


def test_rotary_sampler_with_a_prompt_longer_than_its_reach():
    model = sharp(tiny(rotary=True)).double()
    prompt = torch.randint(0, 11, (1, 40))  # 2 layers x 7 + 1 = 15 tokens reach the next one
    gen = [torch.Generator().manual_seed(5) for _ in range(2)]
    fast = model.generate(prompt, 12, 1.0, generator=gen[0], use_cache=True)
    slow = model.generate(prompt, 12, 1.0, generator=gen[1], use_cache=False)
    assert fast.shape == (1, 52) and torch.equal(fast, slow)


def test_kv_cache_sampler_float32_matches_for_greedy_decoding():
    model = sharp(tiny(block_size=16))
    prompt = torch.randint(0, 11, (1, 16))  # starts with a full window
    fast = model.generate(prompt, 20, temperature=0.0, use_cache=True)
    slow = model.generate(prompt, 20, temperature=0.0, use_cache=False)
    assert torch.equal(fast, slow)


def test_continuous_inputs_and_outputs():
    model = tiny(input_dim=5, output_dim=3).eval()
    x = torch.randn(4, 8, 5)
    out, loss = model(x, torch.zeros(4, 8, 3))
    assert out.shape == (4, 8, 3)
    torch.testing.assert_close(loss, out.pow(2).mean())
    cache = KVCache(model.config, 4, x.device, torch.float32)
    step = torch.cat([model(x[:, :5], cache=cache)[0], model(x[:, 5:6], cache=cache)[0]], dim=1)
    torch.testing.assert_close(step, out[:, :6], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="token model"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 1)


def test_learned_positions_stay_as_they_were():
    """The text model (rotary off): learned position embeddings, added to the input, so the
    same token reads differently at another position; no sequence past the window."""
    model = tiny().eval()
    assert not model.config.rotary and model.transformer.wpe.weight.shape == (8, 16)
    # num_params leaves the position table out, as nanoGPT does.
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total - 8 * 16 and model.num_params(False) == total
    same = torch.full((1, 8), 3)
    out, _ = model(same)
    assert not torch.allclose(out[0, 0], out[0, 1])
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    flat, _ = model(same)
    torch.testing.assert_close(flat[0, 1:], flat[0, :1].expand(7, -1))  # now only the tokens
    with pytest.raises(ValueError, match="context window"):
        tiny(input_dim=5, output_dim=3)(torch.randn(1, 9, 5))


def test_rotary_scores_depend_on_the_offset_alone():
    hs = 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hs, generator=g), torch.randn(hs, generator=g)

    def score(i, j):
        ci, si = rotary_tables(torch.tensor([i]), hs)
        cj, sj = rotary_tables(torch.tensor([j]), hs)
        return (apply_rotary(q[None], ci, si) * apply_rotary(k[None], cj, sj)).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(5, 5) == pytest.approx(float(q @ k), abs=1e-5)  # no offset: no rotation
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    cos, sin = rotary_tables(torch.arange(6), hs)
    assert cos.shape == sin.shape == (6, hs // 2)
    x = torch.randn(6, hs, generator=g)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_rotary_model_has_no_position_table_and_is_shift_invariant():
    """Rotary positions: a window's outputs are the same wherever the window starts."""
    model = sharp(tiny(rotary=True, input_dim=5, output_dim=3)).eval()
    assert model.transformer.wpe is None
    x = torch.randn(2, 8, 5)
    with torch.no_grad():
        out = model.hidden(x)
        cache = KVCache(model.config, 2, x.device, torch.float32)
        model.hidden(x[:, :3], cache)  # three positions cached: the next ones sit at 3..
        after = model.hidden(x[:, 3:5], cache)
        alone = model.hidden(x[:, 3:5])  # the same two steps at positions 0 and 1
    torch.testing.assert_close(after, out[:, 3:5], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(after, alone, atol=1e-3)  # they did attend to the cached steps


def test_rotary_sequences_past_the_window_read_a_sliding_window():
    """Past block_size a rotary model attends over the last block_size positions: with one
    block, position t's output is that of the window ending at t read alone, and inputs older
    than the window do not reach it."""
    model = sharp(tiny(rotary=True, input_dim=5, output_dim=3, n_layer=1, block_size=4)).eval()
    x = torch.randn(2, 13, 5)
    with torch.no_grad():
        out, _ = model(x)
        assert out.shape == (2, 13, 3)
        for t in range(13):
            lo = max(0, t - 3)
            torch.testing.assert_close(model(x[:, lo : t + 1])[0][:, -1], out[:, t])
        changed = x.clone()
        changed[:, 5] += 3.0
        moved, _ = model(changed)
    torch.testing.assert_close(moved[:, :5], out[:, :5])  # causal
    assert not torch.allclose(moved[:, 5:9], out[:, 5:9], atol=1e-4)  # in the window of 5..8
    torch.testing.assert_close(moved[:, 9:], out[:, 9:])  # out of reach from t = 9
    # With two blocks the reach is two windows (less one): t = 5 + 2 * 3 = 11 still moves.
    deep = sharp(tiny(rotary=True, input_dim=5, output_dim=3, n_layer=2, block_size=4)).eval()
    with torch.no_grad():
        a, b = deep(x)[0], deep(changed)[0]
    assert not torch.allclose(a[:, 11], b[:, 11], atol=1e-5)
    torch.testing.assert_close(a[:, 12:], b[:, 12:])
    # A cache cannot hold more than the window, rotary or not.
    cache = KVCache(model.config, 2, x.device, torch.float32)
    with pytest.raises(ValueError, match="context window"):
        model(x[:, :5], cache=cache)


# ----------------------------------------------------------------------------------------------
# tokenisers

SAMPLES = [
    "",
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "naïve café, Ünïcödé ß ø Å — “quotes” … ",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 (ZWJ) and flags 🇫🇷",
    "CJK 漢字かなカナ 한국어, Arabic العربية, Hindi हिन्दी, e\u0301 combining",
    "\t\r\n\x00\x7f control characters",
]


def random_text(rng: random.Random, n: int) -> str:
    """Code points from the whole Unicode range except surrogates (not encodable in UTF-8)."""
    out = []
    while len(out) < n:
        cp = rng.randrange(0x110000)
        if not 0xD800 <= cp <= 0xDFFF:
            out.append(chr(cp))
    return "".join(out)


def test_char_tokenizer_round_trips_text_within_its_vocabulary():
    rng = random.Random(0)
    corpus = "".join(SAMPLES) + random_text(rng, 2000)
    tok = CharTokenizer.from_text(corpus)
    assert tok.vocab_size == len(set(corpus))
    for text in SAMPLES + [random_text(random.Random(0), 2000)]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # plain data, so it survives the checkpoint's weights_only load
    again = tokenizer_from_dict(tok.to_dict())
    assert again.chars == tok.chars and again.encode(SAMPLES[3]) == tok.encode(SAMPLES[3])


def test_char_tokenizer_rejects_unknown_characters_clearly():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match=r"not in the 3-character vocabulary.*'z'"):
        tok.encode("abz")


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    rng = random.Random(1)
    for text in SAMPLES + [random_text(rng, 500) for _ in range(5)]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("😀") == [0xF0, 0x9F, 0x98, 0x80]
    assert tok.decode([0xF0, 0x9F]) == "\ufffd"  # a sampler's broken sequence does not raise
    assert isinstance(tokenizer_from_dict(tok.to_dict()), ByteTokenizer)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="reference corpus not present")
def test_char_tokenizer_on_the_reference_corpus():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65  # as nanoGPT's shakespeare_char
    assert tok.decode(tok.encode(text[:5000])) == text[:5000]


# ----------------------------------------------------------------------------------------------
# training


def test_a_short_training_run_memorises_a_repeated_text():
    text = "the quick brown fox jumps over the lazy dog. " * 20
    tok = CharTokenizer.from_text(text)
    data = torch.tensor(tok.encode(text))
    model = tiny(vocab_size=tok.vocab_size, block_size=16, n_embd=32)
    opt = model.configure_optimizer(0.0, 3e-3, (0.9, 0.99))
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        ix = torch.randint(len(data) - 17, (16,), generator=gen)
        chunk = data[ix[:, None] + torch.arange(17)]  # (B, T + 1)
        _, loss = model(chunk[:, :-1], chunk[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3  # started at ln(27) = 3.3
    out = model.generate(torch.tensor([tok.encode("the quick")]), 36, temperature=0.0)
    assert tok.decode(out[0].tolist()) == text[:45]


def test_learning_rate_schedule():
    cfg = TrainTextConfig(iterations=2000, warmup_iters=100, lr=1e-3, min_lr=1e-4)
    assert get_lr(0, cfg) < get_lr(50, cfg) < get_lr(99, cfg) < 1e-3
    assert get_lr(100, cfg) == pytest.approx(1e-3)
    assert get_lr(1050, cfg) == pytest.approx(5.5e-4)
    assert get_lr(2000, cfg) == pytest.approx(1e-4) and get_lr(3000, cfg) == 1e-4


def test_prompt_override_keeps_the_typed_text():
    # YAML reads `ROMEO:` as a mapping; the sampler must still see the text that was typed
    assert load_config(SampleTextConfig, None, ["prompt=ROMEO:"]).prompt == "ROMEO:"
    assert load_config(SampleTextConfig, None, ["prompt=KING: Hark"]).prompt == "KING: Hark"
    assert load_config(SampleTextConfig, None, ["prompt=42"]).prompt == "42"


# ----------------------------------------------------------------------------------------------
# the CLI


def small_run(data: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "gen", "train-text", f"data={data}", f"runs_dir={runs}", "run_name=t", "progress=false",
        "threads=1", "block_size=16", "n_layer=1", "n_head=2", "n_embd=16", "batch_size=4",
        "eval_iters=2", "eval_interval=3", "warmup_iters=2", *extra,
    ]  # fmt: skip


def test_cli_train_resume_and_sample(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("To be, or not to be, that is the question. 🙂\n" * 30, encoding="utf-8")
    runs = tmp_path / "runs"
    assert main(small_run(data, runs, "iterations=6")) == 0
    ckpt_dir = runs / "t" / "text" / "checkpoints"
    assert latest_checkpoint(ckpt_dir).name == "step_00000006"
    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.state["tokenizer"]["kind"] == "char" and "val" in ckpt.state["losses"]
    assert (runs / "t" / "text" / "tb").is_dir()

    # the same command with more iterations continues from step 6, not from 0
    assert main(small_run(data, runs, "iterations=9")) == 0
    assert latest_checkpoint(ckpt_dir).name == "step_00000009"
    log = (runs / "t" / "text" / "log.txt").read_text(encoding="utf-8")
    assert "resuming from" in log and "iteration 6 of 9" in log and "step 9/9" in log

    capsys.readouterr()
    stage = runs / "t" / "text"
    argv = ["gen", "sample-text", f"checkpoint={stage}", "prompt=To be", "n_tokens=20", "threads=1"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("To be")
    assert main([*argv, "prompt=Zebra"]) == 2  # Z is not in the vocabulary
    assert "not in the" in capsys.readouterr().err

    # a shape-defining change cannot resume the run
    assert main(small_run(data, runs, "iterations=12", "n_embd=32")) == 2
    assert "cannot resume, n_embd" in capsys.readouterr().err


def test_cli_byte_tokenizer(tmp_path):
    data = tmp_path / "bytes.txt"
    data.write_text("héllo wörld 🌍 " * 40, encoding="utf-8")
    assert main(small_run(data, tmp_path, "iterations=3", "tokenizer=byte")) == 0
    assert load_checkpoint(tmp_path / "t" / "text").state["tokenizer"] == {"kind": "byte"}


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["gen", "train-text", "iterations=-1"]) == 2
    assert main(small_run(tmp_path / "missing.txt", tmp_path, "iterations=3")) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(small_run(empty, tmp_path, "iterations=3")) == 2
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(small_run(short, tmp_path, "iterations=3")) == 2
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café ".encode("latin-1") * 100)
    assert main(small_run(latin1, tmp_path, "iterations=3")) == 2
    assert main(["gen", "sample-text", f"checkpoint={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("wm ") for line in err), err
    assert "not found" in err[1] and "empty" in err[2] and "too few" in err[3]
    assert "UTF-8" in err[4] and "no checkpoint" in err[5]
