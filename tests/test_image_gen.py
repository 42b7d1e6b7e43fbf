"""Image generation: the metrics (gen_core.image_metrics), the training steps of all four models
and `wm gen train-image` / `sample` / `eval` on tiny synthetic data."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gen_core.checkpoint import load_checkpoint, load_model, model_spec, save_checkpoint
from gen_core.config import load_config
from gen_core.image_metrics import (
    FeatureConfig,
    FeatureNet,
    compute_features,
    fd_of_features,
    frechet_distance,
    memorisation,
    nearest_distances,
    train_feature_net,
)
from gen_core.vae import VAE, VAEConfig, images_to_float
from rollouts.store import EpisodeStore, StoreInfo
from worldmodels.cli import main as cli
from worldmodels.gen.image import (
    TRAIN_STEP,
    ImageData,
    TrainImageConfig,
    load_image_model,
    main,
    make_optimizers,
    model_config,
    new_model,
    split_units,
)


def synthetic(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 (n, size, size, 3): a red square at a random place on green grass."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, size, size, 3, dtype=torch.uint8)
    images[..., 1] = 160
    side = size * 3 // 8
    for i in range(n):
        y, x = torch.randint(0, size - side, (2,), generator=g).tolist()
        images[i, y : y + side, x : x + side] = torch.tensor([200, 60, 60], dtype=torch.uint8)
    return images


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(synthetic(40, size=20).numpy()):  # 20x20: read at 16x16
        Image.fromarray(img).save(folder / ("sub" if i % 2 else "") / f"{i:03d}.png")
    return folder


def tiny_store(path, episodes: int = 5, frames: int = 12, size: int = 16):
    store = EpisodeStore.create(path, StoreInfo((size, size, 3), "Synthetic-v0", 3))
    for e in range(episodes):
        obs = synthetic(frames + 1, size, seed=e).numpy()
        store.write_episode(
            e,
            {
                "obs": obs,
                "actions": np.zeros((frames, 3), np.float32),
                "rewards": np.zeros(frames, np.float32),
                "terminated": np.zeros(frames, bool),
                "truncated": np.zeros(frames, bool),
            },
        )
    return store


# ----------------------------------------------------------------------------------------------
# metrics


def test_frechet_distance_by_hand():
    # diagonal covariances: FD = ||mu1 - mu2||^2 + sum (sigma1 - sigma2)^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    fd = frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert fd == pytest.approx(5.0 + 9.0 + 9.0 + 0.0)
    # a full covariance against itself: 0; shifted: the squared shift
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    cov = a @ a.T + torch.eye(6)
    assert frechet_distance(mu1.repeat(2), cov, mu1.repeat(2), cov) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(mu1.repeat(2), cov, mu1.repeat(2) + 2, cov) == pytest.approx(24.0)
    feats = torch.randn(500, 4, generator=torch.Generator().manual_seed(1))
    assert fd_of_features(feats, feats) == pytest.approx(0, abs=1e-8)
    assert fd_of_features(feats, feats + 1) == pytest.approx(4.0)


def test_feature_net_is_deterministic_and_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    x = images_to_float(synthetic(10))
    batches = iter([images_to_float(synthetic(8, seed=s)) for s in range(3)])
    net, mse = train_feature_net(batches, FeatureConfig(image_size=16), x, steps=3)
    assert np.isfinite(mse) and not net.training
    # standardised over the images it was fitted on: mean 0, std 1, dead dimensions 0
    f = compute_features(net, x)
    live = torch.isfinite(net.feature_std)
    n_live = int(live.sum())
    assert n_live > 100
    assert torch.allclose(f[:, live].mean(0), torch.zeros(n_live, dtype=f.dtype), atol=1e-5)
    assert torch.allclose(f[:, live].std(0), torch.ones(n_live, dtype=f.dtype), atol=1e-5)
    assert (f[:, ~live] == 0).all()
    assert f.shape == (10, net.config.feature_dim) and f.dtype == torch.float64
    assert torch.equal(f, compute_features(net, x))  # no randomness at all
    assert torch.allclose(f, compute_features(net, x, batch_size=3), atol=1e-5)  # float order
    assert net(x).shape == x.shape
    save_checkpoint(tmp_path, 1, net.state_dict(), {}, {}, model_spec=model_spec(net))
    loaded, _ = load_model(tmp_path, kinds=("FeatureNet",))  # standardisation included
    assert isinstance(loaded, FeatureNet) and loaded.config == net.config
    assert torch.equal(compute_features(loaded, x), f)


def test_memorisation_tells_copies_from_new_images():
    g = torch.Generator().manual_seed(0)
    train, held, new = (torch.randint(0, 256, (n, 8, 8, 3), generator=g, dtype=torch.uint8)
                        for n in (60, 20, 20))  # fmt: skip
    copies = images_to_float(train[:20])
    figures = memorisation(copies, held, train)
    assert figures["nn_ratio"] == 0.0
    assert figures["frac_samples_closer_than_any_held_out"] == 1.0
    fresh = memorisation(images_to_float(new), held, train)
    assert 0.9 < fresh["nn_ratio"] < 1.1
    assert fresh["frac_samples_closer_than_any_held_out"] < 0.2
    # chunking the references changes nothing
    d = nearest_distances(images_to_float(held), train, chunk=7)
    assert torch.allclose(d, nearest_distances(held, train, chunk=1000))


# ----------------------------------------------------------------------------------------------
# data


def test_store_split_is_by_episode_and_fixed(tmp_path):
    tiny_store(tmp_path / "store", episodes=10)
    data = ImageData(tmp_path / "store", 8, held_out=0.2)  # 16x16 frames read at 8x8
    assert len(data.held_units) == 2 and not set(data.held_units) & set(data.train_units)
    assert data.count("train") == 8 * 13
    assert data.load("train").shape == (8 * 13, 8, 8, 3)
    assert len(data.load("held_out", limit=5)) == 5
    batch = next(data.batches(6, seed=0))
    assert batch.shape == (6, 8, 8, 3) and batch.dtype == torch.uint8
    # the split depends on the data alone, not on a run's seed
    assert split_units(list(range(10)), 0.2) == (data.train_units, data.held_units)
    assert split_units([1, 2, 3], 0.0) == ([1, 2, 3], [])


# ----------------------------------------------------------------------------------------------
# training steps: every model learns the synthetic images


def _batches(images: torch.Tensor, batch_size: int):
    g = torch.Generator().manual_seed(0)
    while True:
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images) - batch_size + 1, batch_size):
            yield images[order[i : i + batch_size]]


@pytest.mark.parametrize(
    "model, steps, lr", [("vae", 60, 0.0), ("dcgan", 100, 1e-3), ("wgan-gp", 60, 1e-3),
                         ("ddpm", 60, 1e-3)],
)  # fmt: skip
def test_each_model_learns_a_small_image_set(model, steps, lr):
    """VAE and DDPM: their loss drops. GANs: their losses are a game and need not fall, so the
    test measures what they are for: the mean generated image moves to the data's mean image."""
    torch.manual_seed(0)
    data = synthetic(128)
    cfg = TrainImageConfig(
        model=model, data="-", image_size=16, width=16 if model != "ddpm" else 8,
        batch_size=32, lr=lr, timesteps=100, ddpm_mults=[1, 2], ddpm_attention=[8],
    )  # fmt: skip
    net = new_model(model_config(cfg))
    opts = make_optimizers(model, net, cfg.lr)
    batches = _batches(data, 32)
    real_mean = images_to_float(data).mean(0)
    fixed = images_to_float(data[:64]) * 2 - 1

    def score() -> float:
        if model == "ddpm":  # the loss on a fixed batch with fixed t and noise
            with torch.no_grad():
                return net.loss(fixed, torch.Generator().manual_seed(0)).item()
        net.eval()
        samples = net.sample(64, generator=torch.Generator().manual_seed(1))
        net.train()
        return (samples.mean(0) - real_mean).pow(2).mean().item()

    before, losses = score(), []
    for step in range(steps):
        figures, used = TRAIN_STEP[model](net, opts, batches, cfg, step, torch.device("cpu"))
        assert used == 32 * (5 if model == "wgan-gp" else 1)
        losses.append(figures.get("loss", 0.0))
    after = score()
    assert after < 0.5 * before, (before, after)
    if model == "vae":
        assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


# ----------------------------------------------------------------------------------------------
# the commands


def _json_line(capsys) -> dict:
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0])


TINY = {
    "vae": [],
    "dcgan": [],
    "wgan-gp": ["n_critic=2"],
    "ddpm": ["timesteps=20", "ddpm_mults=[1,2]", "ddpm_attention=[8]", "ddim_steps=4"],
}


@pytest.mark.parametrize("model", list(TINY))
def test_train_sample_eval_on_an_image_folder(tmp_path, image_folder, capsys, model):
    runs = tmp_path / "runs"
    common = [f"runs_dir={runs}", "run_name=t", "progress=false", "threads=1"]
    train = ["gen", "train-image", f"model={model}", f"data={image_folder}", "image_size=16",
             "width=8", "batch_size=8", "steps=3", "checkpoint_every=2", "sample_every=2",
             "grid_n=4", *TINY[model], *common]  # fmt: skip
    assert cli(train) == 0
    stage = runs / "t" / f"image_{model}"
    assert (stage / "config.yaml").is_file() and (stage / "log.txt").is_file()
    assert list((stage / "tb").iterdir())
    assert (stage / "samples" / "step_00000002.png").is_file()
    assert (stage / "checkpoints" / "latest").read_text().strip() == "step_00000003"

    # resume: the same command with more steps continues from step 3
    assert cli([*train[:-len(common)], "steps=4", *common]) == 0  # fmt: skip
    assert (stage / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert "resuming from" in (stage / "log.txt").read_text()
    # the model is rebuilt from model.yaml alone, its kind (dcgan or wgan-gp) read from there
    ck = load_checkpoint(stage / "checkpoints")
    assert ck.model_spec["class"] == {"vae": "VAE", "ddpm": "Diffusion"}.get(model, "GAN")
    assert "model_config" not in ck.state and "model" not in ck.state
    kind, net, _ = load_image_model(stage, "cpu")
    assert kind == model and not net.training

    out = tmp_path / "grid.png"
    sample = ["gen", "sample", f"checkpoint={stage}", "n=5", f"out={out}", "npy=true",
              "ddim_steps=3", *common]  # fmt: skip
    assert cli(sample) == 0
    first = np.load(out.with_suffix(".npy"))
    assert first.shape == (5, 16, 16, 3) and first.dtype == np.uint8
    assert Image.open(out).size == (3 * 17 + 1, 2 * 17 + 1)  # 3 x 2 grid of 16 px + 1 px gaps
    assert cli(sample) == 0  # the same seed draws the same images
    assert np.array_equal(first, np.load(out.with_suffix(".npy")))
    capsys.readouterr()

    assert cli(["gen", "eval", f"checkpoint={stage}", "n=50", "feature_steps=5",
                "ddim_steps=3", *common]) == 0  # fmt: skip
    result = _json_line(capsys)
    assert result["model"] == model and result["step"] == 4
    assert result["n"] == 4  # 10% of 40 images are held out
    for key in ("fd", "fd_real_ref", "fd_mean_frame_ref", "fd_noise_ref", "nn_ratio"):
        assert np.isfinite(result[key]) and result[key] >= 0, key
    assert (runs / "t" / "image_features" / "latest").is_file()  # trained once, then reused
    assert load_checkpoint(runs / "t" / "image_features").model_spec["class"] == "FeatureNet"


def test_train_on_a_store_with_a_time_budget(tmp_path):
    tiny_store(tmp_path / "store")
    cfg = load_config(
        TrainImageConfig,
        overrides=[f"data={tmp_path / 'store'}", "model=dcgan", "image_size=8", "width=4",
                   "batch_size=4", "steps=100000", "time_budget_s=0.5", "grid_n=4",
                   f"runs_dir={tmp_path}", "progress=false"],
    )  # fmt: skip
    summary = main(cfg)
    assert summary["stopped_by_budget"] and 0 < summary["step"] < 100000
    assert summary["train_images_per_s"] > 0
    assert (tmp_path / "default" / "image_dcgan" / "samples").is_dir()


def test_mistakes_are_one_line_errors(tmp_path, image_folder, capsys):
    base = ["gen", "train-image", f"runs_dir={tmp_path / 'runs'}", "progress=false"]
    (tmp_path / "empty").mkdir()
    cases = {
        "model: expected one of": [f"data={image_folder}", "model=gan"],
        "data folder not found": [f"data={tmp_path / 'missing'}"],
        "no images": [f"data={tmp_path / 'empty'}"],
        "expected a rollout store or image folder": [],
        "power of two": [f"data={image_folder}", "model=dcgan", "image_size=48"],
        "fewer training images than": [f"data={image_folder}", "batch_size=1000"],
    }
    for message, overrides in cases.items():
        assert cli([*base, *overrides]) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), err
    assert cli(["gen", "sample", f"checkpoint={tmp_path / 'nothing'}"]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    # V of `wm train-vae` is a VAE too, but no train-image run: refused in one line
    v = VAE(VAEConfig(image_size=16, z_dim=4, widths=(8, 16)))
    save_checkpoint(tmp_path / "v", 1, v.state_dict(), {}, {"z_dim": 4}, model_spec=model_spec(v))
    assert cli(["gen", "sample", f"checkpoint={tmp_path / 'v'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "v/step_00000001: not a train-image checkpoint" in err[-1], err


# ----------------------------------------------------------------------------------------------
# latent diffusion through a VAE


def _tiny_v(path, size: int = 16, steps: int = 150):
    """A small VAE trained briefly on the synthetic images, saved as a checkpoint at `path`."""
    torch.manual_seed(0)
    v = VAE(VAEConfig(image_size=size, z_dim=4, widths=(8, 16), kl_tolerance=0.0))
    opt = torch.optim.Adam(v.parameters(), lr=3e-3)
    batches = _batches(synthetic(128, size), 32)
    for _ in range(steps):
        out = v(images_to_float(next(batches)))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    save_checkpoint(path, steps, v.state_dict(), {}, {"z_dim": 4}, model_spec=model_spec(v))
    return v.eval()


def test_latent_ddpm_learns_the_latents_of_a_tiny_v(tmp_path):
    """The loss on V's codes falls over a few hundred steps and samples decode to images."""
    from worldmodels.gen.image import DecodedLatents, encode_latents, latent_batches

    v = _tiny_v(tmp_path / "v")
    cfg = TrainImageConfig(model="latent-ddpm", data="-", vae="-", image_size=16, width=64,
                           depth=2, timesteps=100, batch_size=64, schedule="cosine")  # fmt: skip
    net = new_model(model_config(cfg, z_dim=4))
    mu, std = encode_latents(v, synthetic(256))
    assert mu.shape == std.shape == (256, 4)
    net.set_latent_stats(mu)
    opts = make_optimizers("latent-ddpm", net, 2e-3)
    batches = latent_batches(mu, std, 64, sample=False)  # the means: a 2-D manifold

    def fixed_loss() -> float:  # on every code, with the same t and noise each time
        with torch.no_grad():
            return net.loss(mu, torch.Generator().manual_seed(0)).item()

    before = fixed_loss()
    for step in range(300):
        TRAIN_STEP["latent-ddpm"](net, opts, batches, cfg, step, torch.device("cpu"))
    after = fixed_loss()
    assert after < 0.9 * before, (before, after)
    # sampled codes spread like V's codes of the data (an untrained model's sit at the mean)
    z = net.eval().sample_ddim(500, 10, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(z.mean(0), mu.mean(0), atol=0.3 * mu.std(0).max().item())
    assert ((z.std(0) / mu.std(0)) - 1).abs().max() < 0.3
    images = DecodedLatents(net, v).sample_ddim(6, 10, 0.0, torch.Generator())
    assert images.shape == (6, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_latent_ddpm_command_records_its_v(tmp_path, image_folder, capsys):
    runs = tmp_path / "runs"
    _tiny_v(tmp_path / "v", steps=2)
    common = [f"runs_dir={runs}", "run_name=t", "progress=false", "threads=1"]
    train = ["gen", "train-image", "model=latent-ddpm", f"vae={tmp_path / 'v'}",
             f"data={image_folder}", "image_size=16", "width=16", "depth=1", "batch_size=8",
             "timesteps=20", "ddim_steps=4", "steps=3", "grid_n=4", *common]  # fmt: skip
    assert cli(train) == 0
    stage = runs / "t" / "image_latent-ddpm"
    ck = load_checkpoint(stage)
    assert ck.model_spec["class"] == "LatentDiffusion" and ck.model_spec["config"]["z_dim"] == 4
    assert ck.state["vae"] == str((tmp_path / "v" / "step_00000002").resolve())
    assert len(ck.state["vae_sha256"]) == 64
    assert (stage / "samples" / "step_00000003.png").is_file()
    kind, model, _ = load_image_model(stage, "cpu")
    assert kind == "latent-ddpm"
    out = tmp_path / "grid.png"
    sample = ["gen", "sample", f"checkpoint={stage}", "n=3", f"out={out}", "npy=true",
              "ddim_steps=3", *common]  # fmt: skip
    assert cli(sample) == 0
    assert np.load(out.with_suffix(".npy")).shape == (3, 16, 16, 3)
    capsys.readouterr()
    assert cli(["gen", "eval", f"checkpoint={stage}", "n=50", "feature_steps=5",
                "ddim_steps=3", *common]) == 0  # fmt: skip
    assert _json_line(capsys)["model"] == "latent-ddpm"
    # V retrained under the same folder: sampling refuses, in one line
    _tiny_v(tmp_path / "v", steps=3)
    import shutil

    shutil.rmtree(tmp_path / "v" / "step_00000002")
    assert cli(sample) == 2
    assert "no checkpoint found" in capsys.readouterr().err.strip().splitlines()[-1]
    assert cli([*sample, f"vae={tmp_path / 'v'}"]) == 2
    assert "not the VAE this latent-ddpm was trained with" in capsys.readouterr().err
    # no V, or V of another image size: one line each
    assert cli(train[:3] + train[4:]) == 2
    assert "vae: latent-ddpm needs a trained VAE" in capsys.readouterr().err
    assert cli([*train, "image_size=8", "run_name=u"]) == 2
    assert "is for 16x16 images, image_size is 8" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# 64x64, the World Models frame size: one training step and samples of every model


@pytest.mark.parametrize("model", ["vae", "dcgan", "wgan-gp", "ddpm", "latent-ddpm"])
def test_every_model_trains_and_samples_at_64x64(tmp_path, model):
    from worldmodels.gen.image import DecodedLatents, generate

    torch.manual_seed(0)
    data = synthetic(16, size=64)
    cfg = TrainImageConfig(
        model=model, data="-", vae="-", image_size=64, width=8 if model != "latent-ddpm" else 32,
        depth=1, batch_size=4, n_critic=1, timesteps=20, ddpm_mults=[1, 2, 2, 2],
    )  # fmt: skip
    v = None
    if model == "latent-ddpm":
        v = VAE(VAEConfig(image_size=64, z_dim=8, widths=(8, 8, 16, 16))).eval()
    net = new_model(model_config(cfg, z_dim=8))
    if v is not None:
        from worldmodels.gen.image import encode_latents, latent_batches

        batches = latent_batches(*encode_latents(v, data), 4, sample=True)
    else:
        batches = _batches(data, 4)
    opts = make_optimizers(model, net, 1e-3)
    for step in range(2):
        figures, _ = TRAIN_STEP[model](net, opts, batches, cfg, step, torch.device("cpu"))
        assert all(np.isfinite(x) for x in figures.values())
    sampler = DecodedLatents(net, v) if v is not None else net
    images = generate(model, sampler, 3, torch.Generator().manual_seed(0), ddim_steps=2)
    assert images.shape == (3, 3, 64, 64) and images.min() >= 0 and images.max() <= 1


def test_ddpm_settings_reach_the_model_and_the_ema_follows_it():
    from worldmodels.gen.image import DEFAULT_PREDICTION

    cfg = TrainImageConfig(model="ddpm", data="-", image_size=16, width=8, ddpm_mults=[1, 2],
                           ddpm_attention=[8], timesteps=50, schedule="cosine", prediction="v",
                           weighting="min-snr", min_snr_gamma=3.0, batch_size=8)  # fmt: skip
    net = new_model(model_config(cfg))
    c = net.config
    assert (c.schedule, c.prediction, c.weighting, c.min_snr_gamma) == ("cosine", "v", "min-snr", 3)
    assert DEFAULT_PREDICTION == {"ddpm": "eps", "latent-ddpm": "v"}  # prediction=auto
    assert model_config(TrainImageConfig(model="ddpm", image_size=16)).prediction == "eps"
    opts = make_optimizers("ddpm", net, 1e-2)
    batches = _batches(synthetic(32), 8)

    def gap() -> float:  # distance of the EMA weights from the trained ones
        return sum((e - p).pow(2).sum().item() for e, p in zip(net.ema.parameters(),
                                                              net.unet.parameters()))  # fmt: skip

    for step in range(3):
        TRAIN_STEP["ddpm"](net, opts, batches, cfg, step, torch.device("cpu"))
    before = gap()
    assert before > 0  # the EMA lags behind the trained weights
    with torch.no_grad():
        net.update_ema(0.5)
    assert gap() == pytest.approx(before / 4, rel=1e-3)  # decay 0.5 halves each weight's gap
