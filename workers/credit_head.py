"""Amortized Shapley credit: a small learned head that predicts each response token's Shapley value (issue 15).

The RM is frozen for a whole RLHF run, so the map (prompt, response) → Shapley values is fixed and can be learned
from the service's own unbiased estimates (stochastic amortization, Covert et al. 2024; FastSHAP, Jethani et al.
2022). The head reads the frozen RM's hidden states of the unmasked input (one forward pass, the score's own for
encoder RMs) and outputs one value per response token; the outputs are projected onto the efficiency plane
Σ v = f(x) − f(∅) (f(∅) from one masked row), so the dense rewards still sum exactly to the score whatever the head
gets wrong: it only redistributes credit.

Two heads share one checkpoint:

* alone: hidden states only (≈ 2–3 rows per response);
* plus: hidden states and a k-pass permutation estimate (2kT rows) as input, learning its correction
  (the estimate + a learned residual). Trained noise2noise-style without extra rows: the input is pass 0 of the
  service's full-budget run and the target the mean of its other passes (`split_passes`). `amortized+k` serves
  blend · alone + (1 − blend) · plus, the weight fitted on the training set's validation split (`_fit_blend`).

Pure torch and numpy; the only I/O is `CreditHead.save` / `CreditHead.load` (atomic, versioned files per RM
revision under `<cache>/credit-heads/`).
"""

from __future__ import annotations

import copy
import io
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

__all__ = [
    "CHECKPOINT_FORMAT",
    "TokenFeatures",
    "Example",
    "CreditHead",
    "FitReport",
    "token_features",
    "split_passes",
    "project_efficient",
    "fit_head",
    "head_dir",
    "list_versions",
    "latest_head_path",
    "spearman",
    "top_k_overlap",
    "train_head",
    "label_example",
    "example_from",
    "save_example",
    "load_example",
]

# Bump when the checkpoint layout changes; older files are refused with a message, not misread.
CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"head-v(\d+)\.pt$")


@dataclass
class TokenFeatures:
    """What the head reads of one (prompt, response), from one forward pass of the frozen RM on the unmasked input."""

    tokens: np.ndarray  # float32 [T, 2H]: last-layer and middle-layer hidden states at the response tokens
    context: np.ndarray  # float32 [H]: last-layer hidden state at the score position ([CLS], or a causal RM's last id)
    # f(x) from the same forward pass where it is the service's score bit for bit (encoder RMs), else None.
    score: Optional[float] = None

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Example:
    """One training example: an explained response."""

    features: TokenFeatures
    delta: float  # f(x) − f(∅): what the values must sum to
    target: np.ndarray  # float64 [T]: the full-budget estimate (the alone head's label)
    # The plus head's input (pass 0 of the full-budget run) and its label (the mean of the other passes), or None
    # when the run had a single pass (then only the alone head learns from it).
    estimate: Optional[np.ndarray] = None
    estimate_target: Optional[np.ndarray] = None
    rows: int = 0  # RM rows the label cost (features row included), for training-cost reports


def token_features(model, rm_input) -> TokenFeatures:
    """Hidden states of the unmasked input for the head (`model` is a loaded `workers.model.RewardModel`).

    Full precision (the score's network). For encoder RMs the forward pass is the score's own, so `score` is the
    sequence score R exactly as the coalition evaluator computes it; causal RMs run their backbone only and leave
    the score to the evaluator (its prompt-cache path differs in the last float bits).
    """
    import torch

    ids = torch.from_numpy(np.ascontiguousarray(rm_input.input_ids[None])).to(model.device)
    kwargs = {"attention_mask": torch.ones_like(ids), "output_hidden_states": True}
    score = None
    with torch.inference_mode():
        if model.reads_last_position:
            out = model.model.base_model(input_ids=ids, **kwargs)
        else:
            if rm_input.token_type_ids is not None:
                kwargs["token_type_ids"] = torch.from_numpy(np.ascontiguousarray(rm_input.token_type_ids[None])).to(model.device)
            out = model.model(input_ids=ids, **kwargs)
            score = float(model._logits_to_score(out.logits)[0])
        hidden = out.hidden_states
        last, middle = hidden[-1][0].float(), hidden[len(hidden) // 2][0].float()
        positions = torch.as_tensor(rm_input.response_positions, device=last.device)
        tokens = torch.cat([last[positions], middle[positions]], dim=-1).cpu().numpy()
        context = last[int(rm_input.score_position)].cpu().numpy()
    return TokenFeatures(tokens=tokens.astype(np.float32), context=context.astype(np.float32), score=score)


def split_passes(passes: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Per-pass values [P, T] → (the plus head's input: pass 0, its label: mean of passes 1..P−1 or None when P = 1).

    Pass 0 of the service's run is what `amortized+k` (k = 1) computes at serving time with the same seed, and
    disjoint passes are (nearly) independent unbiased estimates, so regressing the rest on it learns the denoiser
    of a one-pass estimate (noise2noise) at no extra RM cost.
    """
    passes = np.asarray(passes, dtype=np.float64)
    if len(passes) < 2:
        return passes[0], None
    return passes[0], passes[1:].mean(axis=0)


def project_efficient(values, delta):
    """The closest vector (in L2) with Σ = delta: a uniform shift. Works on numpy [T] or torch [..., T] with a
    broadcastable delta; differentiable, so the head trains through it."""
    n = values.shape[-1]
    return values + (delta - values.sum(-1, keepdims=True) if isinstance(values, np.ndarray) else
                     delta - values.sum(-1, keepdim=True)) / n


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant or has < 2 entries."""
    from scipy.stats import spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = 5) -> float:
    """Share of the k largest |values| of b that are also among the k largest of a."""
    k = min(k, len(a))
    return len(set(np.argsort(-np.abs(a))[:k]) & set(np.argsort(-np.abs(b))[:k])) / k


# ----------------------------------------------------------------------------------------------------------------
# The network


def _net(hidden_size: int, with_estimate: bool, width: int, heads: int):
    import torch
    from torch import nn

    class HeadNet(nn.Module):
        """Per-token features → one token-mixing transformer layer over the response → one value per token.

        Inputs are standardised with statistics frozen at the first fit (buffers, saved with the weights). The alone
        head predicts around the uniform share delta/T; the plus head predicts a residual on its input estimate,
        starting from the estimate itself (output layer zero-initialised).
        """

        def __init__(self):
            super().__init__()
            self.with_estimate = with_estimate
            scalars = 3 + (2 if with_estimate else 0)
            self.n_in = 4 * hidden_size + scalars
            self.register_buffer("mean", torch.zeros(self.n_in))
            self.register_buffer("std", torch.ones(self.n_in))
            self.register_buffer("y_scale", torch.ones(()))
            self.inp = nn.Sequential(nn.Linear(self.n_in, width), nn.GELU(), nn.Dropout(0.1))
            self.mix = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.1, batch_first=True, norm_first=True)
            self.out = nn.Linear(width, 1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def inputs(self, tokens, context, delta, estimate, pad):
            # tokens [B, T, 2H], context [B, H], delta [B], estimate [B, T] or None, pad [B, T] (True = padding)
            B, T, _ = tokens.shape
            H = context.shape[-1]
            n = (~pad).sum(-1, keepdim=True).clamp(min=1).float()  # [B, 1]
            ctx = context[:, None, :].expand(B, T, H)
            position = torch.arange(T, device=tokens.device)[None].float() / n  # relative position in the response
            share = (delta[:, None] / n).expand(B, T)
            cols = [tokens, tokens[..., :H] * ctx, ctx, position[..., None], (1.0 / n).expand(B, T)[..., None], share[..., None]]
            if self.with_estimate:
                cols += [estimate[..., None], (estimate - share)[..., None]]
            return torch.cat(cols, dim=-1)

        def forward(self, tokens, context, delta, estimate, pad):
            x = (self.inputs(tokens, context, delta, estimate, pad) - self.mean) / self.std
            z = self.mix(self.inp(x), src_key_padding_mask=pad)
            raw = self.out(z).squeeze(-1) * self.y_scale
            n = (~pad).sum(-1, keepdim=True).clamp(min=1).float()
            base = estimate if self.with_estimate else (delta[:, None] / n).expand_as(raw)
            values = (base + raw).masked_fill(pad, 0.0)
            # Efficiency projection on the real tokens only (uniform shift).
            shift = (delta[:, None] - values.sum(-1, keepdim=True)) / n
            return (values + shift).masked_fill(pad, 0.0)

    return HeadNet()


def _batch(examples: Sequence[Example], plus: bool):
    """Pad a list of examples into tensors."""
    import torch

    B = len(examples)
    T = max(e.features.n_tokens for e in examples)
    F = examples[0].features.tokens.shape[1]
    H = examples[0].features.context.shape[0]
    tokens = np.zeros((B, T, F), dtype=np.float32)
    context = np.zeros((B, H), dtype=np.float32)
    pad = np.ones((B, T), dtype=bool)
    estimate = np.zeros((B, T), dtype=np.float32)
    target = np.zeros((B, T), dtype=np.float32)
    delta = np.zeros(B, dtype=np.float32)
    for i, e in enumerate(examples):
        n = e.features.n_tokens
        tokens[i, :n] = e.features.tokens
        context[i] = e.features.context
        pad[i, :n] = False
        delta[i] = e.delta
        if plus:
            estimate[i, :n] = e.estimate
            target[i, :n] = e.estimate_target
        else:
            target[i, :n] = e.target
    t = torch.from_numpy
    return t(tokens), t(context), t(delta), t(estimate), t(pad), t(target)


@dataclass
class FitReport:
    """How one head's fit went, on the training set's own validation split (never on evaluation responses)."""

    examples: int
    epochs: int
    seconds: float
    val_mse: float
    val_spearman: float  # mean per-response Spearman on the validation split against its labels (noisy labels)


def fit_head(
    examples: Sequence[Example],
    *,
    plus: bool,
    width: int = 128,
    heads: int = 4,
    epochs: int = 60,
    lr: float = 1e-3,
    batch_size: int = 32,
    val_fraction: float = 0.1,
    patience: int = 10,
    seed: int = 0,
    start=None,
    should_stop: Optional[Callable[[], bool]] = None,
):
    """Fit one head (alone, or plus when `plus`) on examples; returns (net, FitReport).

    The last `val_fraction` of the examples (at least one when there are ≥ 10) is held out for early stopping
    on the MSE against their labels; the best epoch's weights are returned. `start` continues from a previous net
    (online training keeps its normalisation). `should_stop` is polled between batches (the background trainer
    stops when the service shuts down).
    """
    import torch

    usable = [e for e in examples if not plus or e.estimate_target is not None]
    if not usable:
        raise ValueError("no examples to fit" + (" with per-pass estimates (plus head)" if plus else ""))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_val = int(round(len(usable) * val_fraction)) if len(usable) >= 10 else 0
    train, val = list(usable[: len(usable) - n_val]), list(usable[len(usable) - n_val:])
    H = usable[0].features.context.shape[0]
    net = copy.deepcopy(start) if start is not None else _net(H, plus, width, heads)
    if start is None:
        # Freeze input standardisation and the output scale on the training split.
        with torch.no_grad():
            tok, ctx, dl, est, pad, tgt = _batch(train[:512], plus)
            x = net.inputs(tok, ctx, dl, est, pad)[~pad]
            net.mean.copy_(x.mean(0))
            net.std.copy_(x.std(0).clamp(min=1e-4))
            resid = (tgt - (est if plus else dl[:, None] / (~pad).sum(-1, keepdim=True)))[~pad]
            net.y_scale.fill_(float(resid.std().clamp(min=1e-6)))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    started = time.perf_counter()
    best, best_state, since, epochs_run = math.inf, copy.deepcopy(net.state_dict()), 0, 0
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(len(train))
        for lo in range(0, len(train), batch_size):
            if should_stop is not None and should_stop():
                break
            tok, ctx, dl, est, pad, tgt = _batch([train[i] for i in order[lo: lo + batch_size]], plus)
            pred = net(tok, ctx, dl, est, pad)
            # Mean squared error per real token, in units of the residual scale.
            loss = (((pred - tgt) / net.y_scale) ** 2).masked_fill(pad, 0.0).sum() / (~pad).sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
        epochs_run = epoch + 1
        if should_stop is not None and should_stop():
            break
        if not val:
            best_state = copy.deepcopy(net.state_dict())
            continue
        mse = _val_mse(net, val, plus)
        if mse < best - 1e-9:
            best, best_state, since = mse, copy.deepcopy(net.state_dict()), 0
        else:
            since += 1
            if since >= patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    val_rho = float("nan")
    if val:
        rhos = [spearman(_predict(net, e, plus), e.estimate_target if plus else e.target) for e in val]
        val_rho = float(np.nanmean(rhos)) if np.any(np.isfinite(rhos)) else float("nan")
    report = FitReport(examples=len(train), epochs=epochs_run, seconds=time.perf_counter() - started,
                       val_mse=best if val else float("nan"), val_spearman=val_rho)
    return net, report


def _val_mse(net, val, plus) -> float:
    import torch

    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(val), 64):
            tok, ctx, dl, est, pad, tgt = _batch(val[lo: lo + 64], plus)
            pred = net(tok, ctx, dl, est, pad)
            total += float((((pred - tgt) / net.y_scale) ** 2).masked_fill(pad, 0.0).sum())
            count += int((~pad).sum())
    net.train()
    return total / max(1, count)


def _predict(net, example: Example, plus: bool) -> np.ndarray:
    return _predict_raw(net, example.features, example.delta, example.estimate if plus else None)


def _predict_raw(net, features: TokenFeatures, delta: float, estimate: Optional[np.ndarray]) -> np.ndarray:
    import torch

    T = features.n_tokens
    with torch.no_grad():
        tok = torch.from_numpy(features.tokens[None].astype(np.float32))
        ctx = torch.from_numpy(features.context[None].astype(np.float32))
        dl = torch.tensor([delta], dtype=torch.float32)
        est = torch.zeros((1, T)) if estimate is None else torch.from_numpy(np.asarray(estimate, dtype=np.float32)[None])
        pad = torch.zeros((1, T), dtype=torch.bool)
        out = net(tok, ctx, dl, est, pad)[0].double().numpy()
    # Float64 projection: Σ = delta to float64 rounding (the float32 net's own projection is approximate).
    return project_efficient(out, float(delta))


# ----------------------------------------------------------------------------------------------------------------
# The head: both nets, their version and the RM they belong to


@dataclass
class CreditHead:
    """A trained credit head for one RM revision.

    `version` counts the heads trained for this RM revision (1, 2, ...), so every answer can name the one it used.
    `passes` is k of `amortized+k`: the plus head reads a k-pass estimate (2kT rows); 1 today.
    """

    rm_name: str
    rm_revision: str
    version: int
    hidden_size: int
    alone: object  # the HeadNet without estimate input
    plus: Optional[object] = None  # the HeadNet with the k-pass estimate as input, or None (not trained yet)
    passes: int = 1
    # amortized+k = blend · alone + (1 − blend) · plus: an inverse-variance weighting of the head's own prediction and
    # the pass-reading head, whose errors are partly independent; fitted on the training set's validation split.
    blend: float = 0.0
    examples: int = 0  # explained responses it was trained on
    label_rows: int = 0  # RM rows those labels cost
    created: float = field(default_factory=time.time)
    reports: dict = field(default_factory=dict)  # "alone" / "plus": FitReport as a dict

    def predict(self, features: TokenFeatures, delta: float, estimate: Optional[np.ndarray] = None) -> np.ndarray:
        """Values on the response tokens with Σ = delta (to float64 rounding): the alone head, or the plus head when
        an estimate is given."""
        if features.n_tokens == 0:
            return np.zeros(0)
        if estimate is None:
            return _predict_raw(self.alone, features, delta, None)
        if self.plus is None:
            raise ValueError("this credit head has no plus head (trained without per-pass estimates)")
        plus = _predict_raw(self.plus, features, delta, estimate)
        if self.blend == 0.0:
            return plus
        # Both sum to delta, so the blend does too (re-projected for float64 rounding).
        return project_efficient(self.blend * _predict_raw(self.alone, features, delta, None) + (1 - self.blend) * plus, delta)

    # -- files ------------------------------------------------------------------------------------------------
    def save(self, directory: os.PathLike) -> Path:
        """Write `<directory>/head-v<version>.pt` atomically (temporary file + os.replace); returns its path."""
        import torch

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"head-v{self.version}.pt"
        payload = {
            "format": CHECKPOINT_FORMAT,
            "rm_name": self.rm_name,
            "rm_revision": self.rm_revision,
            "version": self.version,
            "hidden_size": self.hidden_size,
            "passes": self.passes,
            "blend": self.blend,
            "examples": self.examples,
            "label_rows": self.label_rows,
            "created": self.created,
            "reports": self.reports,
            "alone": _net_state(self.alone),
            "plus": None if self.plus is None else _net_state(self.plus),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: os.PathLike) -> "CreditHead":
        import torch

        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: credit-head format {payload.get('format')!r}, this version reads {CHECKPOINT_FORMAT}")
        H = int(payload["hidden_size"])
        return cls(
            rm_name=payload["rm_name"], rm_revision=payload["rm_revision"], version=int(payload["version"]),
            hidden_size=H, alone=_net_from(payload["alone"], H, False),
            plus=None if payload["plus"] is None else _net_from(payload["plus"], H, True),
            passes=int(payload["passes"]), blend=float(payload.get("blend", 0.0)), examples=int(payload["examples"]), label_rows=int(payload["label_rows"]),
            created=float(payload["created"]), reports=dict(payload["reports"]),
        )


def _net_state(net) -> dict:
    return {"width": net.inp[0].out_features, "heads": net.mix.self_attn.num_heads, "state": net.state_dict()}


def _net_from(saved: dict, hidden_size: int, plus: bool):
    net = _net(hidden_size, plus, int(saved["width"]), int(saved["heads"]))
    net.load_state_dict(saved["state"])
    net.eval()
    return net


def train_head(
    examples: Sequence[Example],
    *,
    rm_name: str,
    rm_revision: str,
    version: int,
    label_rows: int = 0,
    previous: Optional[CreditHead] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    **fit_kwargs,
) -> CreditHead:
    """Fit both heads on `examples` (the plus head only on those with per-pass estimates) into a new version.

    With `previous` the nets continue from its weights (online training); otherwise they start fresh.
    """
    from dataclasses import asdict

    alone, report = fit_head(examples, plus=False, start=None if previous is None else previous.alone,
                             should_stop=should_stop, **fit_kwargs)
    reports = {"alone": asdict(report)}
    plus, blend = None, 0.0
    if any(e.estimate_target is not None for e in examples):
        start = None if previous is None else previous.plus
        plus, plus_report = fit_head(examples, plus=True, start=start, should_stop=should_stop, **fit_kwargs)
        reports["plus"] = asdict(plus_report)
        blend = _fit_blend(alone, plus, examples, fit_kwargs.get("val_fraction", 0.1))
        reports["blend"] = blend
    return CreditHead(
        rm_name=rm_name, rm_revision=rm_revision, version=version, hidden_size=int(examples[0].features.context.shape[0]),
        alone=alone, plus=plus, blend=blend, examples=len(examples), label_rows=label_rows, reports=reports,
    )


def _fit_blend(alone, plus, examples: Sequence[Example], val_fraction: float) -> float:
    """The weight λ ∈ [0, 1] of the alone head in λ·alone + (1 − λ)·plus minimising the squared error against the
    plus head's label (passes 1..P−1, not read by either head) on the validation split `fit_head` held out of the
    plus head's examples; 0 when there is none. Least squares in closed form: λ = Σ⟨a − p, y − p⟩ / Σ‖a − p‖²."""
    usable = [e for e in examples if e.estimate_target is not None]
    n_val = int(round(len(usable) * val_fraction)) if len(usable) >= 10 else 0
    if n_val == 0:
        return 0.0
    num = den = 0.0
    for e in usable[len(usable) - n_val:]:
        a = _predict(alone, e, False)
        p = _predict(plus, e, True)
        num += float(np.dot(a - p, e.estimate_target - p))
        den += float(np.dot(a - p, a - p))
    return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Where checkpoints live


def head_dir(rm_name: str, rm_revision: str, root: Optional[os.PathLike] = None) -> Path:
    """`<root or cache>/credit-heads/<rm name>@<revision>/`: one folder per RM revision (a retrained RM never
    reads another revision's head)."""
    if root is None:
        from workers.demo_model import default_cache_dir

        root = default_cache_dir()
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{rm_name}@{rm_revision}")
    return Path(root) / "credit-heads" / safe


def list_versions(directory: os.PathLike) -> List[int]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for m in (_NAME.search(p.name) for p in directory.iterdir()) if m)


def latest_head_path(directory: os.PathLike) -> Optional[Path]:
    versions = list_versions(directory)
    return Path(directory) / f"head-v{versions[-1]}.pt" if versions else None


# ----------------------------------------------------------------------------------------------------------------
# Labels: one explained response, as the service explains it at full budget


def label_example(model, evaluator, rm_input, *, seed: int = 0, counter=None) -> Example:
    """Explain one response the way the service does at full budget (the default shap estimator and budget, at
    `seed`) and return it as a training example (`rows`: the RM rows it cost, features row included)."""
    from workers.evaluator import RowCounter
    from workers.explainers import explain_shap

    counter = counter if counter is not None else RowCounter()
    before = counter.rows
    features = token_features(model, rm_input)
    score = features.score if features.score is not None else evaluator.score(rm_input, counter)
    att = explain_shap(lambda m: evaluator(rm_input, m, counter), rm_input.n_tokens, seed=seed)
    example = example_from(features, score, att)
    example.rows = counter.rows - before + 1
    return example


def example_from(features: TokenFeatures, score: float, att) -> Example:
    """A training example from an explanation (`workers.explainers.Attribution`) of the same input."""
    delta = float(score) - float(att.base_value)
    target = project_efficient(np.asarray(att.values, dtype=np.float64), delta)
    estimate = estimate_target = None
    if att.passes is not None and len(att.passes) >= 2:
        first, rest = split_passes(att.passes)
        estimate, estimate_target = project_efficient(first, delta), project_efficient(rest, delta)
    return Example(features=features, delta=delta, target=target, estimate=estimate, estimate_target=estimate_target)


def save_example(example: Example, path: os.PathLike) -> None:
    """One example as .npz (float16 hidden states), written atomically: label caches resume after a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "tokens": example.features.tokens.astype(np.float16),
        "context": example.features.context.astype(np.float16),
        "delta": np.float64(example.delta),
        "target": example.target,
        "rows": np.int64(example.rows),
    }
    if example.estimate is not None:
        arrays["estimate"], arrays["estimate_target"] = example.estimate, example.estimate_target
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_example(path: os.PathLike) -> Example:
    with np.load(Path(path)) as z:
        features = TokenFeatures(tokens=z["tokens"].astype(np.float32), context=z["context"].astype(np.float32))
        return Example(
            features=features, delta=float(z["delta"]), target=z["target"],
            estimate=z["estimate"] if "estimate" in z else None,
            estimate_target=z["estimate_target"] if "estimate_target" in z else None,
            rows=int(z["rows"]) if "rows" in z else 0,
        )
