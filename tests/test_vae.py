import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from gen_core.checkpoint import latest_checkpoint, load_checkpoint, model_spec, save_checkpoint
from gen_core.config import to_dict
from gen_core.errors import UserError
from gen_core.vae import VAE, VAEConfig, images_to_float, images_to_uint8
from rollouts.store import EpisodeStore, StoreInfo
from worldmodels.cli import main as wm
from worldmodels.encode import EncodeConfig
from worldmodels.encode import main as encode_main
from worldmodels.episodes import prefetch, split_episodes
from worldmodels.latents import LatentStore
from worldmodels.models import load_vae, vae_from_checkpoint
from worldmodels.train_vae import TrainVAEConfig, main, oversized_decoder_hint, vae_config

TINY = VAEConfig(image_size=16, z_dim=4, widths=(8, 16))


def squares(rng: np.random.Generator, n: int, size: int = 16) -> np.ndarray:
    """uint8 (n, size, size, 3): a coloured square at a random place on a dark background."""
    frames = np.full((n, size, size, 3), 30, dtype=np.uint8)
    for img in frames:
        y, x = rng.integers(0, size - 5, 2)
        img[y : y + 5, x : x + 5] = rng.integers(100, 256, 3)
    return frames


def toy_store(path, episodes: int = 5, steps: int = 30, seed: int = 0) -> EpisodeStore:
    rng = np.random.default_rng(seed)
    info = StoreInfo(frame_shape=(16, 16, 3), env_id="Toy-v0", action_dim=3)
    store = EpisodeStore.create(path, info)
    for i in range(episodes):
        store.write_episode(
            i,
            {
                "obs": squares(rng, steps + 1),
                "actions": rng.normal(size=(steps, 3)).astype(np.float32),
                "rewards": rng.normal(size=steps).astype(np.float32),
                "terminated": np.arange(steps) == steps - 1,
                "truncated": np.zeros(steps, bool),
            },
        )
    return store


def tiny_overrides(tmp_path) -> list[str]:
    return [
        f"runs_dir={tmp_path}",
        "run_name=toy",
        "z_dim=4",
        "widths=[8, 16]",
        "batch_size=16",
        "progress=false",
        "threads=1",
    ]


# ------------------------------------------------------------------------------------ the model


def test_shapes_of_encode_decode_sample():
    torch.manual_seed(0)
    model = VAE(TINY)
    x = images_to_float(torch.from_numpy(squares(np.random.default_rng(0), 5)))
    assert x.shape == (5, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 4)
    assert model.decode(mu).shape == (5, 3, 16, 16)
    gen = torch.Generator().manual_seed(1)
    samples = model.sample(3, generator=gen)
    assert samples.shape == (3, 3, 16, 16) and 0 <= samples.min() and samples.max() <= 1
    assert torch.equal(samples, model.sample(3, generator=torch.Generator().manual_seed(1)))
    recon, mu, logvar, *losses = model(x)
    assert recon.shape == x.shape and all(t.shape == () for t in losses)
    assert images_to_uint8(x).shape == (5, 16, 16, 3)


def test_default_is_the_world_models_architecture():
    cfg = VAEConfig()
    assert cfg.encoder_sizes() == [64, 31, 14, 6, 2] and cfg.flat_size == 1024
    assert cfg.decoder_kernels() == (5, 5, 6, 6)
    model = VAE(cfg)
    assert [d.out_channels for d in model.decoder.deconvs] == [128, 64, 32, 3]
    assert sum(p.numel() for p in model.parameters()) == 4_348_547
    with torch.no_grad():
        assert model.decode(torch.zeros(2, 32)).shape == (2, 3, 64, 64)
    for size, widths in ((32, (8, 16, 32)), (48, (8, 16, 32)), (24, (8, 16))):
        with torch.no_grad():
            out = VAE(VAEConfig(image_size=size, widths=widths)).decode(torch.zeros(1, 32))
        assert out.shape == (1, 3, size, size)
    with pytest.raises(ValueError):
        VAEConfig(image_size=16, widths=(8, 16, 32, 64))


def test_oversized_decoder_hint_names_widths_that_end_at_2x2():
    assert oversized_decoder_hint(VAEConfig()) is None  # 64x64: World Models' 2x2 map
    hint = oversized_decoder_hint(VAEConfig(image_size=96))  # CarRacing's own frame size
    assert "4x4 map" in hint and "9x9 kernel" in hint and "43,837,059" in hint
    assert "widths=[32, 64, 128, 256, 256] would give 3,455,363" in hint
    alt = VAEConfig(image_size=96, widths=(32, 64, 128, 256, 256))
    assert alt.encoder_sizes()[-1] == 1 and oversized_decoder_hint(alt) is None
    assert "widths=[8, 16, 16]" in oversized_decoder_hint(VAEConfig(image_size=30, widths=(8, 16)))


def test_first_deconv_as_matmul_equals_the_transposed_conv():
    torch.manual_seed(0)
    model = VAE(VAEConfig()).double()
    z = torch.randn(3, 32, dtype=torch.double)
    x = model.decoder.fc(z).view(3, 1024, 1, 1)
    for i, deconv in enumerate(model.decoder.deconvs):
        x = deconv(x if i == 0 else torch.relu(x))
    torch.testing.assert_close(torch.sigmoid(x), model.decode(z), rtol=0, atol=1e-12)


def test_loss_matches_hand_computed_value():
    model = VAE(TINY)  # z_dim 4, kl_tolerance 0.5: KL floor 2 nats per image
    x = torch.full((2, 3, 16, 16), 0.5)
    recon = torch.full((2, 3, 16, 16), 0.25)
    mu = torch.tensor([[3.0, 0, 0, 0], [1.0, 0, 0, 0]])
    logvar = torch.tensor([[0.0, math.log(4.0), 0, 0], [0.0, 0, 0, 0]])
    total, rec, kl = model.loss(x, recon, mu, logvar)
    # reconstruction: 768 pixels x 0.25^2 per image
    assert rec.item() == pytest.approx(48.0)
    # KL image 1: 0.5 * 3^2 + 0.5 * (4 - 1 - ln 4) = 4.5 + 0.8069; image 2: 0.5, floored to 2
    kl1 = 4.5 + 0.5 * (4 - 1 - math.log(4))
    assert kl.item() == pytest.approx((kl1 + 2.0) / 2, rel=1e-6)
    assert total.item() == pytest.approx(48.0 + (kl1 + 2.0) / 2, rel=1e-6)
    plain = VAE(VAEConfig(image_size=16, z_dim=4, widths=(8, 16), kl_tolerance=0.0))
    assert plain.loss(x, recon, mu, logvar)[2].item() == pytest.approx((kl1 + 0.5) / 2, rel=1e-6)


def test_bottom_rows_weigh_their_error():
    cfg = VAEConfig(image_size=16, z_dim=4, widths=(8, 16), bottom_rows=2, bottom_weight=10.0)
    x = torch.zeros(1, 3, 16, 16)
    recon = torch.zeros(1, 3, 16, 16)
    recon[..., -2:, :] = 0.5  # error only in the weighted rows: 96 values x 0.25 x 10
    recon[..., 0, 0] = 1.0  # and one unweighted pixel per channel: 3 x 1
    _, rec, _ = VAE(cfg).loss(x, recon, torch.zeros(1, 4), torch.zeros(1, 4))
    assert rec.item() == pytest.approx(96 * 0.25 * 10 + 3)


def test_bf16_autocast_loss_is_close_to_fp32():
    torch.manual_seed(0)
    model = VAE(VAEConfig(image_size=32, z_dim=8, widths=(16, 32, 64)))
    x = images_to_float(torch.from_numpy(squares(np.random.default_rng(0), 8, 32)))
    gen = torch.Generator().manual_seed(0)
    fp32 = model(x, generator=gen).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(x, generator=torch.Generator().manual_seed(0)).loss
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model = VAE(TINY).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.from_numpy(squares(np.random.default_rng(0), 512))
    losses = []
    for _ in range(300):
        batch = data[torch.randint(0, len(data), (32,))]
        out = model(images_to_float(batch))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.recon_loss.item())
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.5 * first, (first, last)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = VAE(TINY)
    opt = torch.optim.Adam(model.parameters())
    x = images_to_float(torch.from_numpy(squares(np.random.default_rng(0), 4)))
    model(x).loss.backward()
    opt.step()
    save_checkpoint(
        tmp_path,
        1,
        model.state_dict(),
        {"optimizer": opt.state_dict()},
        {"lr": 1},
        model_spec=model_spec(model),
    )
    other, config = load_vae(tmp_path)  # rebuilt from model.yaml alone
    assert other.config == TINY and not other.training and config == {"lr": 1}
    model.eval()
    with torch.no_grad():
        for a, b in zip(model.encode(x), other.encode(x)):
            assert torch.equal(a, b)
        z = torch.randn(3, 4)
        assert torch.equal(model.decode(z), other.decode(z))


# ------------------------------------------------------------------------------- the stages


def test_split_holds_out_at_least_one_and_is_stable_as_the_store_grows():
    train, held = split_episodes([0, 1, 2], 0.05, seed=0)
    assert len(held) == 1 and sorted(train + held) == [0, 1, 2]
    train, held = split_episodes(list(range(200)), 0.05, seed=0)
    _, held_more = split_episodes(list(range(400)), 0.05, seed=0)
    assert 3 <= len(held) <= 25 and set(held) <= set(held_more)
    with pytest.raises(UserError):
        split_episodes([0], 0.05, seed=0)


def test_prefetch_keeps_order_raises_errors_and_stops_early():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise UserError("bad episode")

    with pytest.raises(UserError, match="bad episode"):
        list(prefetch(broken(), depth=2))
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    for item in prefetch(endless(), depth=2):
        if item == 5:
            break
    n = len(produced)
    assert n <= 5 + 4  # the thread stopped a few items ahead, not running on forever
    time.sleep(0.3)
    assert len(produced) == n


def test_max_frames_per_epoch_caps_the_steps(tmp_path):
    toy_store(tmp_path / "toy" / "store", episodes=3)
    assert wm(["train-vae", *tiny_overrides(tmp_path), "epochs=1", "max_frames_per_epoch=40"]) == 0
    log = (tmp_path / "toy" / "vae" / "log.txt").read_text()
    assert "2 steps of 16 per epoch" in log


def test_train_resume_and_encode(tmp_path):
    store = toy_store(tmp_path / "toy" / "store")
    cfg = TrainVAEConfig(
        runs_dir=str(tmp_path),
        run_name="toy",
        epochs=1,
        batch_size=16,
        z_dim=4,
        widths=[8, 16],
        progress=False,
        threads=1,
        heldout_fraction=0.2,
    )
    assert main(cfg) == 0
    ckpt_dir = tmp_path / "toy" / "vae" / "checkpoints"
    first = load_checkpoint(ckpt_dir)
    assert first.step == 1 and first.state["epoch"] == 1
    # V's config lives in model.yaml, the same way as every model's, not in the training state
    assert first.model_spec["class"] == "VAE" and "vae_config" not in first.state
    assert first.model_spec["config"] == to_dict(vae_config(cfg, [16, 16, 3]))
    for name in ("recon.png", "samples.png", "recon_epoch_0001.png"):
        assert Image.open(tmp_path / "toy" / "vae" / name).format == "PNG"

    cfg.epochs = 3
    assert main(cfg) == 0
    assert latest_checkpoint(ckpt_dir).name == "step_00000003"
    log = (tmp_path / "toy" / "vae" / "log.txt").read_text()
    assert "resuming after epoch 1" in log and "epoch 2/3" in log and "epoch 1/3" not in log
    assert main(cfg) == 0  # already done: nothing to train
    assert "already trained for 3 epochs" in (tmp_path / "toy" / "vae" / "log.txt").read_text()

    enc = EncodeConfig(runs_dir=str(tmp_path), run_name="toy", batch_size=7, progress=False)
    assert encode_main(enc) == 0
    latents = LatentStore(tmp_path / "toy" / "latents")
    assert latents.indices() == store.indices()
    assert latents.info()["vae_step"] == 3
    for i, ep in latents.iter_episodes():
        frames = store.load(i)
        assert ep["mu"].shape == ep["logvar"].shape == (len(frames["obs"]), 4)
        assert ep["mu"].dtype == np.float32
        np.testing.assert_array_equal(ep["actions"], frames["actions"])
        np.testing.assert_array_equal(ep["terminated"], frames["terminated"])
    # mu is the encoder's output for each frame
    model, ckpt = vae_from_checkpoint(ckpt_dir)
    assert ckpt.step == 3 and model.config.widths == (8, 16)
    with torch.no_grad():
        mu, _ = model.encode(images_to_float(torch.from_numpy(store.load(2)["obs"])))
    np.testing.assert_allclose(latents.load(2)["mu"], mu.numpy(), rtol=1e-5, atol=1e-5)

    # resumable: nothing is rewritten by the same checkpoint; a new episode is added
    mtime = latents.episode_path(0).stat().st_mtime_ns
    toy_store(tmp_path / "toy" / "store2", episodes=6)
    store.write_episode(5, EpisodeStore(tmp_path / "toy" / "store2").load(5))
    assert encode_main(enc) == 0
    assert latents.episode_path(0).stat().st_mtime_ns == mtime and 5 in latents.indices()

    # a changed VAE re-encodes everything
    cfg.epochs = 4
    assert main(cfg) == 0
    assert encode_main(enc) == 0
    assert latents.info()["vae_step"] == 4 and latents.episode_path(0).stat().st_mtime_ns != mtime

    # a corrupt latent file is a one-line error naming it
    latents.episode_path(1).write_bytes(b"not a zip")
    with pytest.raises(UserError, match="ep_000001.npz"):
        latents.load(1)


def test_resume_refuses_a_different_shape(tmp_path, capsys):
    toy_store(tmp_path / "toy" / "store", episodes=3)
    args = ["train-vae", *tiny_overrides(tmp_path), "epochs=1"]
    assert wm(args) == 0
    capsys.readouterr()
    assert wm([*args, "epochs=2", "z_dim=8"]) == 2
    assert "z_dim is 4 in the checkpoint but 8" in capsys.readouterr().err


def test_load_vae_refuses_what_is_not_v(tmp_path):
    save_checkpoint(tmp_path / "old", 1, VAE(TINY).state_dict(), {}, {})  # no model.yaml
    with pytest.raises(UserError, match="old.*no model.yaml") as err:
        load_vae(tmp_path / "old")
    assert "\n" not in str(err.value)
    from gen_core.mdnrnn import MDNRNN, MDNRNNConfig

    m = MDNRNN(MDNRNNConfig(z_dim=4, hidden=8))
    save_checkpoint(tmp_path / "m", 1, m.state_dict(), {}, {}, model_spec=model_spec(m))
    with pytest.raises(UserError, match="m/step_00000001: holds a MDNRNN, expected VAE"):
        load_vae(tmp_path / "m")


@pytest.mark.parametrize(
    "bad",
    [
        "epochs=0",
        "batch_size=0",
        "lr=0",
        "widths=[]",
        "widths=[8, 16, 32, 64]",  # too deep for 16x16 frames
        "heldout_fraction=0.9",
        "precision=fp16",
        "kl_tolerance=-1",
        "store=/nonexistent/store",
        "batch_size=1000",  # larger than the training set
    ],
)
def test_bad_settings_exit_2(tmp_path, bad, capsys):
    toy_store(tmp_path / "toy" / "store", episodes=3)
    assert wm(["train-vae", *tiny_overrides(tmp_path), bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("wm train-vae: error:")


def test_corrupt_episode_exits_2_and_encode_needs_a_checkpoint(tmp_path, capsys):
    store = toy_store(tmp_path / "toy" / "store", episodes=4)
    store.episode_path(1).write_bytes(b"garbage")
    store.episode_path(2).write_bytes(b"garbage")
    assert wm(["train-vae", *tiny_overrides(tmp_path), "epochs=1"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert wm(["encode", f"runs_dir={tmp_path}", "run_name=toy"]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
