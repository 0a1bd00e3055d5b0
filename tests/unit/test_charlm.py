"""The char-lm workload: a small causal transformer over bytes and the byte-window corpus loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import corpus
from pipeline.corpus import load_chars
from pipeline.models.char_lm import CharLMConfig, char_lm

TINY = {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}


def write_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (root / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(60)))
    (root / "notes.txt").write_text("not python, not read")
    return root


def test_model_maps_token_ids_to_next_token_logits_over_the_byte_vocabulary() -> None:
    model = char_lm(**TINY)
    x = torch.randint(0, 256, (3, 10))  # (B, T)
    assert model(x).shape == (3, 10, 256)  # (B, T, V)


def test_model_rejects_a_sequence_longer_than_its_block_size() -> None:
    with pytest.raises(ValueError, match="block_size 16"):
        char_lm(**TINY)(torch.zeros(1, 17, dtype=torch.int64))


def test_changing_a_future_token_leaves_the_logits_of_earlier_positions_unchanged() -> None:
    torch.manual_seed(0)
    model = char_lm(**TINY).eval()
    x = torch.randint(0, 256, (2, 16))
    x2 = x.clone()
    x2[:, 9] = (x2[:, 9] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_state_dict_holds_each_tensor_once_so_checkpoints_can_store_it() -> None:
    from pipeline.checkpoint import decode_checkpoint, encode_checkpoint, initial_checkpoint

    ckpt = initial_checkpoint("char-lm", dict(TINY), seed=0)
    back = decode_checkpoint(encode_checkpoint(ckpt), "test")
    model = back.build()
    assert set(back.state) == {n for n, _ in model.named_parameters()}  # tied output layer adds no entry
    assert torch.equal(back.state["wte.weight"], ckpt.state["wte.weight"])


def test_a_few_steps_of_plain_training_reduce_the_loss(tmp_path: Path) -> None:
    from pipeline.training import loss_fn

    torch.manual_seed(0)
    ds = load_chars(block_size=16, max_chars=20_000, root=str(write_corpus(tmp_path / "src")))
    model = char_lm(**TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = ds.x_train[:16], ds.y_train[:16]  # (16, 16)
    losses = []
    for _ in range(15):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_loader_gives_next_byte_targets_and_a_fixed_split(tmp_path: Path) -> None:
    root = str(write_corpus(tmp_path / "src"))
    a = load_chars(block_size=16, max_chars=5_000, root=root)
    b = load_chars(block_size=16, max_chars=5_000, root=root)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.x_train.dtype == torch.int64 and a.x_train.shape[1] == 16
    assert torch.equal(a.x_train[:, 1:], a.y_train[:, :-1])  # y is x shifted by one
    assert a.meta == {"name": "chars", "task": "lm", "vocab_size": 256, "block_size": 16, "chars": 5_000}
    assert a.n_train + a.x_test.shape[0] == (5_000 - 1) // 16
    other = load_chars(block_size=16, max_chars=5_000, root=root, seed=1)
    assert not torch.equal(other.x_test, a.x_test)


def test_loader_reads_the_standard_library_by_default_and_stops_at_max_chars() -> None:
    ds = load_chars(block_size=32, max_chars=10_000)
    assert ds.n_train + ds.x_test.shape[0] == (10_000 - 1) // 32
    assert int(ds.x_train.max()) < 256
    assert corpus.stdlib_sources() == sorted(corpus.stdlib_sources())


def test_loader_names_the_folder_when_it_holds_no_python_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_chars(root=str(tmp_path))


def test_char_lm_and_chars_are_built_in_names() -> None:
    from pipeline.data import load_dataset
    from pipeline.models import build_model, default_args, model_task

    assert model_task("char-lm") == "lm"
    model = build_model("char-lm", dict(TINY))
    ds = load_dataset("chars", {"block_size": 16, "max_chars": 4_000})
    assert model(ds.x_train[:2]).shape == (2, 16, 256)
    assert default_args("char-lm") == {**CharLMConfig().__dict__}


def test_pipeline_gradient_covers_every_parameter_of_the_lm(tmp_path: Path) -> None:
    from pipeline.training import evaluate, gradient

    ds = load_chars(block_size=16, max_chars=5_000, root=str(write_corpus(tmp_path / "src")))
    model = char_lm(**TINY)
    r = gradient(model, ds.x_train[:4], ds.y_train[:4])
    assert set(r.update) == {n for n, _ in model.named_parameters()}
    assert r.samples == 4
    metrics = evaluate(model, ds.x_test, ds.y_test, "lm")
    assert 1.0 < metrics["perplexity"] < 1_000
