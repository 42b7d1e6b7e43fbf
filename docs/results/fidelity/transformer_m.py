"""M as a causal Transformer: the measurement behind "A Transformer in place of the LSTM" (README.md
here). A prototype for one question, not a toolkit module.

gen_core's GPT (`gen_core/transformer.py`) on [z_t, a_t] vectors, with learned positions and a
512-step window, under MDN-RNN's heads and loss (`gen_core/mdnrnn.py`: the same mixture of z_t+1,
reward and done, trained on the same chunks as `wm train-mdnrnn`). It plugs into `wm fidelity`
by standing in for M's one-step function: the key/value caches live in a bank inside the model,
and M's "c" carries (cache id, row, length) for each rollout, so the fidelity code that copies,
repeats and steps (z, h, c) works unchanged.

    python docs/results/fidelity/transformer_m.py train --run const --name tf4 --seed 0
    python docs/results/fidelity/transformer_m.py fidelity --run const --name tf4 -- \\
        fidelity --config configs/carracing_small.yaml run_name=const \\
        mdnrnn=runs/const/mdnrnn_L500/checkpoints name=tf4 strip=[]
    python docs/results/fidelity/transformer_m.py probe --run const --name tf4 -- \\
        --run const --mdnrnn mdnrnn_L500

(`fidelity` and `probe` take an LSTM M's folder only for what they read beside the step: its
config and V; every dream step goes through the Transformer.)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from gen_core.io import atomic_path
from gen_core.mdnrnn import MDNRNN, MDNOutput
from gen_core.transformer import KVCache, Transformer, TransformerConfig
from worldmodels import mdnrnn as W
from worldmodels.latents import LatentStore

BANK_SIZE = 12  # caches kept, least recently used dropped first


def copy_rows(dst: KVCache, dst_rows, src: KVCache, src_rows, length: int) -> None:
    """Keys and values of src's rows into dst's rows, positions [0, length), every layer."""
    for layer in range(len(dst.k)):
        dst.k[layer][dst_rows, :, :length] = src.k[layer][src_rows, :, :length]
        dst.v[layer][dst_rows, :, :length] = src.v[layer][src_rows, :, :length]


def plug_in(module, model: TransformerM) -> None:
    """Make `module.mdnrnn_step` (the one-step dream function) step `model`, whatever M it is
    handed."""
    one_step = module.mdnrnn_step
    module.mdnrnn_step = lambda _, tau, threshold=0.5: one_step(model, tau, threshold)


class TransformerM(nn.Module):
    def __init__(self, z_dim, action_dim, done_reward, layers=4, embd=128, heads=4, dropout=0.0):
        super().__init__()
        m_cfg = W.TrainMDNRNNConfig(hidden=embd, done_pos_weight=10.0)
        self.config = m_cfg.model_config(z_dim, action_dim, done_reward)
        self.heads = MDNRNN(self.config)
        del self.heads.lstm  # only its mixture, reward and done heads and its loss are used
        self.core = Transformer(
            TransformerConfig(
                block_size=512,
                n_layer=layers,
                n_head=heads,
                n_embd=embd,
                dropout=dropout,
                input_dim=z_dim + action_dim,
                output_dim=1,
            )
        )
        self.bank: dict[int, KVCache] = {}
        self.used: dict[int, int] = {}
        self.next_id, self.clock = 1, 0

    def forward(self, z: torch.Tensor, action: torch.Tensor) -> MDNOutput:
        h = self.core.hidden(torch.cat([z, action], -1))  # (B, T, embd)
        return self.heads._heads(h, None)

    def loss(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.heads.loss(*args, **kwargs)

    def _touch(self, cid: int) -> None:
        self.clock += 1
        self.used[cid] = self.clock

    def _cache_for(self, c: torch.Tensor, B: int) -> tuple[int, KVCache]:
        """The cache that continues the states c (B, 3): (cache id, row, length) per rollout.

        The caller's own last state continues in place; any other (a start state repeated, or
        one stepped from before) gets a fresh cache holding a copy of its rows up to its length.
        """
        ids, rows = c[:, 0].long(), c[:, 1].long()
        if ids[0] > 0 and bool((ids == ids[0]).all()):
            cache = self.bank.get(int(ids[0]))
            if (
                cache is not None
                and cache.k[0].shape[0] == B
                and bool((rows == torch.arange(B)).all())
                and int(c[0, 2]) == cache.length
            ):
                self._touch(int(ids[0]))
                return int(ids[0]), cache
        new = KVCache(self.core.config, B, "cpu", torch.float32)
        length = 0
        for i in ids.unique().tolist():
            if i == 0:  # a zero state: nothing cached yet
                continue
            src, sel = self.bank[i], (ids == i).nonzero()[:, 0]
            length = int(c[sel[0], 2])  # the state's own length: src may have grown since
            self._touch(i)
            copy_rows(new, sel, src, rows[sel], length)
        new.length = length
        cid, self.next_id = self.next_id, self.next_id + 1
        self.bank[cid] = new
        self._touch(cid)
        for old in sorted(self.bank, key=self.used.get)[:-BANK_SIZE]:
            del self.bank[old], self.used[old]
        return cid, new

    @torch.no_grad()
    def step(self, z, action, state=None) -> MDNOutput:
        """MDNRNN.step's contract: z (B, z_dim), action (B, A), state ((1, B, .), (1, B, .))."""
        B = z.shape[0]
        c = state[1][0] if state is not None else torch.zeros(B, 3)
        cid, cache = self._cache_for(c, B)
        h = self.core.hidden(torch.cat([z, action], -1)[:, None], cache)  # (B, 1, embd)
        out = self.heads._heads(h, None)
        c_new = torch.zeros(B, max(3, c.shape[1]))
        c_new[:, 0], c_new[:, 1], c_new[:, 2] = cid, torch.arange(B), cache.length
        return MDNOutput(
            out.logit_pi, out.mu, out.log_sigma, out.reward, out.done_logit, h,
            (h[:, 0][None], c_new[None]),
        )  # fmt: skip


def free_run_loss(model: TransformerM, b: dict, k: int, gen: torch.Generator) -> torch.Tensor:
    """M's loss on a window of k steps in which it runs on its own draws (τ 1) from a real z,
    after the chunk's real steps before the window (their keys and values without gradient):
    `free_run` of `wm train-mdnrnn`, one window per batch at a random step."""
    B = b["z"].shape[0]
    shortest = int(b["mask"].sum(1).min())
    if shortest < k + 2:
        return torch.zeros(())
    s = int(torch.randint(1, shortest - k + 1, (1,), generator=gen))
    x = torch.cat([b["z"], b["actions"]], -1)  # (B, L, z + a)
    with torch.no_grad():
        cache = KVCache(model.core.config, B, "cpu", torch.float32)
        model.core.hidden(x[:, :s], cache)
        own = [b["z"][:, s]]  # the window starts from the real z
        for j in range(k - 1):
            h = model.core.hidden(torch.cat([own[-1], b["actions"][:, s + j]], -1)[:, None], cache)
            own.append(model.heads.sample(model.heads._heads(h, None), 1.0, gen)[:, 0])
    prefix = KVCache(model.core.config, B, "cpu", torch.float32)
    every = torch.arange(B)
    copy_rows(prefix, every, cache, every, s)
    prefix.length = s
    window = torch.cat([torch.stack(own, 1), b["actions"][:, s : s + k]], -1)  # (B, k, z + a)
    out = model.heads._heads(model.core.hidden(window, prefix), None)
    w = slice(s, s + k)
    terms = model.loss(out, b["z_next"][:, w], b["rewards"][:, w], b["done"][:, w], b["mask"][:, w])
    return terms["loss"]


def build(meta: dict) -> TransformerM:
    keys = ("z_dim", "action_dim", "done_reward", "layers", "embd", "heads", "dropout")
    return TransformerM(*(meta[k] for k in keys))


def model_path(run: str, name: str) -> Path:
    return Path("runs", run, name, "transformer_m.pt")


def const_recipe(run: str, name: str, seed: int, **overrides) -> W.TrainMDNRNNConfig:
    """The settings of run const's `mdnrnn_L500`: seq_len 500, batch 8, paid ends, the config's
    clipped trailing reward."""
    return W.TrainMDNRNNConfig(
        run_name=run,
        out_name=name,
        seq_len=500,
        batch_size=8,
        done_reward="clipped",
        reward_target="trailing",
        reward_clip=[-1.0, 100.0],
        seed=seed,
        progress=False,
        **overrides,
    )


def train(args: argparse.Namespace) -> None:
    """M's recipe of run const (seq_len 500, batch 8, paid ends), AdamW with warm-up and a
    cosine decay to a tenth; the schedule counts 30 batches an epoch until the first epoch has
    counted its own."""
    torch.manual_seed(args.seed)
    cfg = const_recipe(args.run, args.name, args.seed, z_noise=args.z_noise)
    store = LatentStore(cfg.latents_path())
    episodes = W.load_episodes(store, cfg)
    train_eps, held_eps = W.split_latent_episodes(store, episodes, cfg)
    meta = dict(
        z_dim=episodes[0].mu.shape[1],
        action_dim=episodes[0].actions.shape[1],
        done_reward=W.clipped_end_reward(store, cfg.reward_clip),
        layers=args.layers,
        embd=args.embd,
        heads=4,
        dropout=args.dropout,
    )
    model = build(meta)
    params = list(model.parameters())
    print(f"{sum(p.numel() for p in params)} parameters, {len(train_eps)} train episodes")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    held = W.make_chunks(held_eps, cfg.seq_len, np.random.default_rng(args.seed), True, False,
                         cfg.z_noise)  # fmt: skip
    total, it = args.epochs * 30, 0
    gen = torch.Generator().manual_seed(args.seed)  # free-run windows and draws
    for epoch in range(args.epochs):
        batches = W.training_batches(train_eps, cfg, np.random.default_rng([args.seed, epoch]))
        model.train()
        t0, loss_sum = time.time(), 0.0
        for b, _ in batches:
            decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, it / total)))
            for g in opt.param_groups:
                g["lr"] = args.lr * min(1.0, (it + 1) / 50) * decay
            terms = model.loss(model(b["z"], b["actions"]), b["z_next"], b["rewards"],
                               b["done"], b["mask"])  # fmt: skip
            if args.free_run:
                terms["loss"] = terms["loss"] + free_run_loss(model, b, args.free_run, gen)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            loss_sum += terms["loss"].item()
            it += 1
        total = args.epochs * len(batches)
        model.eval()
        with torch.no_grad():
            h = model.loss(model(held["z"], held["actions"]), held["z_next"], held["rewards"],
                           held["done"], held["mask"])  # fmt: skip
        print(
            f"epoch {epoch + 1}: train {loss_sum / len(batches):.4f} held-out nll "
            f"{h['nll']:.4f} reward_mse {h['reward_mse']:.4f} done_bce {h['done_bce']:.4f} "
            f"{time.time() - t0:.0f}s",
            flush=True,
        )
    with atomic_path(model_path(args.run, args.name)) as tmp:
        torch.save({"meta": meta, "model": model.state_dict()}, tmp)


def load(args: argparse.Namespace) -> TransformerM:
    ck = torch.load(model_path(args.run, args.name), weights_only=True)
    model = build(ck["meta"])
    model.load_state_dict(ck["model"])
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["train", "fidelity", "probe"])
    ap.add_argument("--run", default="const")
    ap.add_argument("--name", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--z-noise", type=float, default=1.0, help="mdnrnn's z_noise")
    ap.add_argument("--free-run", type=int, default=0, help="window of own draws (0: none)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.rest = argv[cut + 1 :]  # after --: the wm fidelity / speed probe arguments
    torch.set_num_threads(2)
    if args.what == "train":
        return train(args)
    model = load(args)
    if args.what == "fidelity":
        import worldmodels.fidelity as fidelity
        from worldmodels.cli import main as wm

        plug_in(fidelity, model)
        sys.exit(wm(args.rest))
    spec = importlib.util.spec_from_file_location(
        "probe", Path(__file__).with_name("speed_probe.py")
    )
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    plug_in(probe, model)
    sys.argv = ["speed_probe.py", *args.rest]
    probe.main()


if __name__ == "__main__":
    main()
