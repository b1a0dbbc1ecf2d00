"""Inner loop: PPO on SmolLM2-135M with per-token rewards from a running TokenCredit service (via the SDK).

Usage (one trial of the BO controller, or one seed of one arm):

    python -m examples.bilevel_sentiment.train --service http://127.0.0.1:8000 --steps 30 --seed 0 \
        [--weights '{"sparse": 0.2, "attention": 0.8}']    # else the service's weights, pinned to
                                                            # $TOKENCREDIT_SHAPING_VERSION when that is set

Prints one JSON line per PPO step and, last, the objective: the mean RM score of the trained policy on held-out
prompts (the line the BO controller reads). `--out FILE` also writes the whole curve as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from tokencredit import Client, as_torch

from .data import tweet_openings
from .policy import SplitPolicy, ensure_policy_weights, load_policy
from .ppo import PPOConfig, ppo_step, rollout


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--service", default=os.environ.get("TOKENCREDIT_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", help="JSON simplex weights for every request (overrides the service's)")
    ap.add_argument("--shap-rows", type=int, default=None, help="shap rows per response (default: the server's)")
    ap.add_argument("--lime-samples", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=PPOConfig.batch_size)
    ap.add_argument("--response-tokens", type=int, default=PPOConfig.response_tokens)
    ap.add_argument("--lr", type=float, default=PPOConfig.lr)
    ap.add_argument("--bias-lr", type=float, default=30.0, help="SGD lr of the logit bias (0: no logit bias)")
    ap.add_argument("--kl-coef", type=float, default=PPOConfig.kl_coef)
    ap.add_argument("--n-trainable", type=int, default=2, help="decoder layers that learn (the rest are frozen)")
    ap.add_argument("--samples-per-prompt", type=int, default=4,
                    help="responses per prompt in a batch; their mean score is the prompt's baseline (0: none)")
    ap.add_argument("--temperature", type=float, default=PPOConfig.temperature)
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=2, help="sampled responses per held-out prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the curve and the result here (JSON)")
    return ap.parse_args(argv)


def banned_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)


def rollout_items(ro) -> list:
    """Dense-rewards items for a rollout: the policy's own token ids, which the SDK turns into offsets."""
    return [{"prompt": p, "response_token_ids": ids.tolist()} for p, ids in zip(ro.prompts, ro.response_ids)]


def score_policy(policy, tokenizer, client: Client, prompts, samples: int, cfg: PPOConfig, banned, seed: int) -> float:
    """Mean RM score of sampled responses to `prompts` (fixed sampling seed, so arms see the same randomness)."""
    torch.manual_seed(seed)
    scores = []
    for _ in range(samples):
        ro = rollout(policy, tokenizer, prompts, cfg, banned)
        items = rollout_items(ro)
        scores += client.scores(items, tokenizer=tokenizer)
    return float(np.mean(scores))


def main(argv=None) -> float:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.RandomState(args.seed)
    cfg = PPOConfig(batch_size=args.batch_size, response_tokens=args.response_tokens, lr=args.lr,
                    kl_coef=args.kl_coef, minibatch_size=min(PPOConfig.minibatch_size, args.batch_size),
                    temperature=args.temperature)
    group = max(1, args.samples_per_prompt)
    if cfg.batch_size % group:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of --samples-per-prompt {group}")
    weights = json.loads(args.weights) if args.weights else None
    version = os.environ.get("TOKENCREDIT_SHAPING_VERSION")
    shaping = {"weights": weights} if weights else {"shaping_version": int(version)} if version else {}
    # Budgets only for components in use: naming an explainer in `methods` makes the server compute it even at
    # weight 0. Under a pinned version the BO controller passes the weights in $TOKENCREDIT_WEIGHTS.
    in_use = weights or json.loads(os.environ.get("TOKENCREDIT_WEIGHTS") or "{}")
    methods = {}
    if args.shap_rows and in_use.get("shap", 1.0) > 0:
        methods["shap"] = {"max_rows": args.shap_rows, "seed": args.seed}
    if args.lime_samples and in_use.get("lime", 1.0) > 0:
        methods["lime"] = {"num_samples": args.lime_samples, "seed": args.seed}

    tokenizer, model = load_policy(ensure_policy_weights())
    policy = SplitPolicy(model, n_trainable=args.n_trainable, logit_bias=args.bias_lr > 0)
    optimizer = [torch.optim.Adam(policy.layer_parameters(), lr=cfg.lr)]
    if args.bias_lr > 0:
        # Plain SGD, not Adam: Adam's per-coordinate normalisation would move all 49k biases by ~lr on noise;
        # SGD moves a token's bias in proportion to the advantage it actually collected.
        optimizer.append(torch.optim.SGD([policy.logit_bias], lr=args.bias_lr))
    banned = banned_ids(tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    train_prompts, held_out = tweet_openings()
    held_out = held_out[: args.eval_prompts]
    curve = []
    started = time.perf_counter()
    with Client(args.service, timeout=300.0) as client:
        for step in range(args.steps):
            t0 = time.perf_counter()
            picked = rng.choice(len(train_prompts), cfg.batch_size // group, replace=False)
            prompts = [train_prompts[i] for i in picked for _ in range(group)]
            ro = rollout(policy, tokenizer, prompts, cfg, banned)
            t1 = time.perf_counter()
            items = rollout_items(ro)
            dense = client.dense_rewards(items, tokenizer=tokenizer, methods=methods or None, **shaping)
            token_rewards = as_torch(dense, length=cfg.response_tokens)
            scores = torch.tensor([d.score for d in dense])
            if args.samples_per_prompt > 1:
                # The prompt's mean score as a baseline, on the last token: a function of the prompt alone, so it
                # changes no optimal policy (potential-based), and the same for every arm. It removes the
                # prompt-to-prompt spread that a young value head cannot yet predict.
                token_rewards[:, -1] -= scores.view(-1, group).mean(1).repeat_interleave(group)
            t2 = time.perf_counter()
            stats = ppo_step(policy, optimizer, ro, token_rewards, cfg, banned, generator)
            t3 = time.perf_counter()
            row = {"step": step, "reward": float(np.mean([d.score for d in dense])),
                   "gen_s": round(t1 - t0, 2), "rewards_s": round(t2 - t1, 2), "ppo_s": round(t3 - t2, 2),
                   **{k: round(v, 5) for k, v in stats.items()}}
            curve.append(row)
            print(json.dumps(row), flush=True)
        t_eval = time.perf_counter()
        objective = score_policy(policy, tokenizer, client, held_out, args.eval_samples, cfg, banned, seed=10_000)
    result = {"objective": objective, "curve": curve, "seed": args.seed, "weights": weights,
              "shaping_version": int(version) if version and not weights else None,
              "train_s": round(t_eval - started, 1), "eval_s": round(time.perf_counter() - t_eval, 1),
              "config": vars(cfg), "n_trainable": args.n_trainable,
              "args": {"bias_lr": args.bias_lr, "samples_per_prompt": args.samples_per_prompt, "threads": args.threads}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{objective:.6f}", flush=True)
    return objective


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
