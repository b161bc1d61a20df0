"""Label accuracy of conditional samples: the fraction of samples that a classifier assigns the class they asked
for (the "classification accuracy" of conditional generative models, beside FID; cf. Ho & Salimans 2022).

The judge: on the class-conditional gmm the exact Bayes classifier (argmax_k p(y = k | x), class = component);
on digits_cond (and digits with classifier guidance) the shipped clean-data digits classifier
(models/weights/digits_classifier.pt, the FID feature network's head), not the noise-aware classifier that guides.  Standard error binomial, sqrt(acc (1 - acc) / n).  Only for conditional models (bench.guidance).
"""
from __future__ import annotations

import math

import torch

from bench import guidance
from bench.metrics import Metric, MetricContext, register_metric
from bench.metrics.columns import Column, book


def judge(model, n_classes=None):
    """(name, predict(x) -> class per row) for a conditional or classifier-guided run with n_classes classes (default
    the model's), or None where there is no classifier.  Never the guiding classifier: on digits the clean-data
    classifier, a different network from the noise-aware one that guides."""
    data, feats = model.data, model.feature_net
    n_classes = model.n_classes if n_classes is None else n_classes
    if data is not None and hasattr(data, "posterior") and getattr(data, "K", None) == n_classes:
        return "exact_posterior", lambda x: data.posterior(x.to(torch.float64).flatten(1).cpu()).argmax(1)
    if feats is not None and hasattr(feats, "probs"):
        return "classifier", lambda x: feats.probs(x).argmax(1).cpu()
    return None


def binomial(correct: torch.Tensor) -> tuple[float, float]:
    """Accuracy and its binomial standard error sqrt(p (1 - p) / n)."""
    n = int(correct.numel())
    p = float(correct.double().mean())
    return p, math.sqrt(p * (1 - p) / n)


@register_metric("label_acc")
class LabelAccuracy(Metric):
    columns = (
        Column("label_acc", "label accuracy (classifier's class = requested label)", "", quality=True,
               better="higher", se="label_acc_se", change="relative", tol="fid",
               se_how="binomial, sqrt(p(1-p)/n)"),
        book("label_acc_se", "binomial standard error of label_acc"),
        book("label_acc_note", "why label_acc is not available"),
    )

    def protocol(self, ctx: MetricContext) -> dict:
        cond = guidance.of_context(ctx)
        j = judge(ctx.model, cond.n_classes if cond else None)
        return {"metric": "label_acc", "judge": j[0] if j else None,
                "judge_weights": _feature_hash(ctx.model) if j and j[0] == "classifier" else None,
                "labels": cond.labels if cond else None, "n_samples": int(ctx.samples.shape[0])}

    def compute(self, ctx: MetricContext) -> dict:
        cond = guidance.of_context(ctx)
        j = judge(ctx.model, cond.n_classes if cond else None)
        if cond is None or j is None:
            return {"label_acc": None, "label_acc_note": f"n/a: model {ctx.model.name} has no classifier or exact "
                                                         f"class posterior to judge its samples"}
        n = int(ctx.samples.shape[0])
        want = cond.labels_of(range(n))
        bs = ctx.batch_size
        with torch.no_grad():
            pred = torch.cat([j[1](ctx.samples[i:i + bs]) for i in range(0, n, bs)])
        acc, se = binomial(pred == want)
        return {"label_acc": acc, "label_acc_se": se}


def _feature_hash(model) -> str:
    from bench.metrics.fid import _module_hash

    return _module_hash(model.feature_net)
