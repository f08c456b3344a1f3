"""RSMatch (docs/method.md section 2) on top of any SSL base algorithm's pseudo-labels and masks.

Model: one container with the classifier (encoder f, real head h_r, fake head h_f) and the
deepfake detector (encoder g, binary head d), so DDP, DeepSpeed, EMA and checkpoints see one
model with one optimizer. Each step does one forward of the container:
    classifier on cat(x_lb, u_w, u_s)      detector on cat(queue sample, x_lb, u_w, u_s)
(x_lb strongly augmented for the detector with `strong_labeled`). With `shared_encoder`
(ablation "w/o ind. models") the detector head d sits on f instead: the detector's images that
the classifier does not already see (the queue sample, and x_lb's strong view) ride along in
the classifier's forward, and every image passes f once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rsmatch import evaluate
from rsmatch.algorithms.base import (
    Algorithm,
    BatchViews,
    DataInfo,
    EvalContext,
    SSLAlgorithm,
    StepContext,
    StepOutput,
    cross_entropy,
    ssl_bases,
)
from rsmatch.config import Config, check, option
from rsmatch.csqueue import CSQueue
from rsmatch.data.batch import Batch, Provenance
from rsmatch.registry import algorithms, register_algorithm

if TYPE_CHECKING:  # imported where built or exported, as in rsmatch.algorithms.base
    from rsmatch.models import Classifier, Detector

REAL, SYNTHETIC = 0, 1


@dataclass
class RSMatchConfig:
    base: str = option("fixmatch", "SSL algorithm whose pseudo-labels and masks RSMatch wraps.")
    detector_backbone: str = option(
        "wrn16_1", "Deepfake detector encoder (any timm name); ignored with shared_encoder."
    )
    queue_length: int = option(16, "L: length of each class sub-queue.")
    queue_picks: int = option(10, "M: sub-queues updated per step (all when C <= M).")
    queue_topk: int = option(1, "k: samples pushed per picked sub-queue.")
    class_wise: bool = option(
        True, "Class-wise CSQueue; False = one FIFO of length C*L fed with the top M*k."
    )
    shared_encoder: bool = option(
        False, "Ablation 'w/o ind. models': the detector head sits on the classifier encoder."
    )
    fake_head: bool = option(
        True, "False = ablation 'w/o fake head': detected synthetic images are dropped."
    )
    detector_threshold: float = option(0.95, "tau of the detector's pseudo-labels, loss (3).")
    strong_labeled: bool = option(
        False, "Strongly augment labeled reals in the detector's supervised loss (2)."
    )

    def validate(self) -> None:
        bases = ssl_bases()
        check(self.base in bases, "rsmatch.base", self.base, f"one of {', '.join(bases)}")
        tau = self.detector_threshold
        check(0 < tau <= 1, "rsmatch.detector_threshold", tau, "not in (0, 1]")
        for key in ("queue_length", "queue_picks", "queue_topk"):
            check(getattr(self, key) >= 1, f"rsmatch.{key}", getattr(self, key), "must be >= 1")


class RSMatchModel(nn.Module):
    """Classifier + detector. forward(classifier_images, detector_images, shared).

    Ablation "w/o ind. models": no detector, and `shared_head`, the binary head on the
    classifier's features, instead."""

    def __init__(
        self, classifier: Classifier, detector: Detector | None, shared_head: nn.Module | None
    ) -> None:
        if (detector is None) == (shared_head is None):
            raise ValueError("RSMatchModel: a detector or a shared head, exactly one")
        super().__init__()
        self.classifier = classifier
        self.detector = detector
        self.shared_head = shared_head

    def forward(
        self, x_cls: torch.Tensor, x_det: torch.Tensor, shared: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Classifier outputs on x_cls and detector logits on x_det, whose last `shared` rows
        are the last rows of x_cls (the shared encoder sees those once)."""
        if self.detector is not None:
            return self.classifier(x_cls), self.detector(x_det)
        n = len(x_cls)
        out = self.classifier(torch.cat([x_cls, x_det[: len(x_det) - shared]]))
        feat = out["feat"]
        det_feat = torch.cat([feat[n:], feat[n - shared : n]])
        return {k: v[:n] for k, v in out.items()}, self.shared_head(det_feat)

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Detector logits for evaluation."""
        if self.detector is not None:
            return self.detector(x)
        return self.shared_head(self.classifier(x)["feat"])


@register_algorithm("rsmatch", RSMatchConfig)
class RSMatch(Algorithm):
    progress_metrics = ("mask_rate", "batch_detector_acc")

    def __init__(self, cfg: Config, info: DataInfo) -> None:
        super().__init__(cfg, info)
        r = cfg.rsmatch
        self.base: SSLAlgorithm = algorithms()[r.base].cls(cfg, info)
        self.queue = CSQueue(info.num_classes, r.queue_length, r.queue_picks, r.queue_topk,
                             info.image_shape, r.class_wise)  # fmt: skip

    def build_model(self) -> RSMatchModel:
        from rsmatch.models import Detector, linear_head

        r, d = self.cfg.rsmatch, self.cfg.data
        classifier = self.base.build_model(fake_head=r.fake_head)
        if r.shared_encoder:
            return RSMatchModel(classifier, None, linear_head(classifier.encoder.num_features, 2))
        detector = Detector(r.detector_backbone, d.mean, d.std, self.cfg.model.bn_momentum)
        return RSMatchModel(classifier, detector, None)

    def step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> StepOutput:
        r = self.cfg.rsmatch
        b, u = len(batch.x_lb), len(batch.u_w)
        # B items from the queue: drawn globally with the step's generator, this rank's slice.
        # Drawn before this step's push, so (2) sees the queue as of the previous step (only
        # reals at step 0): the push needs this forward's detector scores on u_w, and the
        # sample must be in this same forward (one detector forward per step, as the paper).
        global_b = b * ctx.world
        queued = self.queue.sample(global_b, ctx.generator)[ctx.rank * b : (ctx.rank + 1) * b]
        x_lb_det = batch.x_lb_s if r.strong_labeled else batch.x_lb
        x_cls = torch.cat([batch.x_lb, batch.u_w, batch.u_s])
        x_det = torch.cat([queued, x_lb_det, batch.u_w, batch.u_s])
        shared = 2 * u if r.strong_labeled else b + 2 * u  # x_det's rows that end x_cls too
        cls_out, det_logits = model(x_cls, x_det, shared)
        views = self.base.split(cls_out, b, u)
        det_q, det_lb, det_w, det_s = det_logits.split([len(queued), b, u, u])

        # Base SSL pseudo-labels: yhat_j and the confidence mask m_j (FixMatch: max p_r >= tau).
        pl = self.base.pseudo_labels(views, batch, ctx)
        yhat = views.w["logits"].detach().argmax(-1)

        # (1) synthetic score s_j on the weak view; detector pseudo-labels zhat_j. The queue
        # ranks by the fp32 logit margin, the log-odds of s_j: the same order, but it does not
        # saturate at 1.0 (where ties would fall back to batch position).
        det_w = det_w.detach().float()
        score = det_w[:, SYNTHETIC] - det_w[:, REAL]
        p_d = det_w.softmax(-1)
        det_conf, zhat = p_d.max(-1)

        # (2) detector, supervised: labeled reals are real, queued items synthetic.
        loss_ds = F.cross_entropy(det_lb, torch.full_like(batch.y_lb, REAL))
        if len(queued):
            loss_ds = loss_ds + F.cross_entropy(
                det_q, det_q.new_full((len(queued),), SYNTHETIC, dtype=torch.long)
            )
        # (3) detector, unsupervised: FixMatch on its own binary pseudo-labels.
        det_mask = (det_conf >= r.detector_threshold).float()
        loss_du = (F.cross_entropy(det_s, zhat, reduction="none") * det_mask).mean()

        # (4) classifier, labeled.
        loss_s = self.base.supervised_loss(views, batch)
        # (5) unlabeled images the detector calls real train the real head.
        called_real = (zhat == REAL).float()
        loss_ur = (cross_entropy(views.s["logits"], pl.targets) * pl.mask * called_real).mean()
        losses = {"loss_s": loss_s, "loss_ur": self.cfg.ssl.lambda_u * loss_ur}
        # (6) those called synthetic train the encoder through the fake head (or are dropped).
        if r.fake_head:
            called_fake = 1.0 - called_real
            loss_uf = (
                cross_entropy(views.s["fake_logits"], pl.targets) * pl.mask * called_fake
            ).mean()
            losses["loss_uf"] = self.cfg.ssl.lambda_u * loss_uf
        # (7) total = sum of the named terms (the trainer sums them).
        losses.update(loss_ds=loss_ds, loss_du=loss_du, **pl.losses)

        self.queue.update(score, yhat, batch.u_w, batch.idx_ulb, ctx.generator, ctx.gather)

        fill = self.queue.fill().float() / self.queue.capacity
        metrics = {
            "mask_rate": pl.mask.mean(),
            "mask_real_rate": (pl.mask * called_real).mean(),
            "mask_fake_rate": (pl.mask * (1 - called_real)).mean(),
            "detector_mask_rate": det_mask.mean(),
            "pool_called_synthetic": zhat.float().mean(),
            "labeled_called_synthetic": (det_lb.argmax(-1) == SYNTHETIC).float().mean(),
            "queue_fill": fill.mean(),
            **(
                {f"queue_fill/{c}": f for c, f in enumerate(fill.unbind())}
                if self.queue.class_wise
                else {}
            ),
            **pl.metrics,
        }
        probes = {"synthetic_pred": zhat}
        # every metric is computed from detached values: no graph is kept until the next log
        return StepOutput(losses, metrics, probes)

    # -- what the trainer asks ---------------------------------------------------------------
    @property
    def views(self) -> BatchViews:
        return BatchViews(unlabeled=True, strong_labeled=self.cfg.rsmatch.strong_labeled)

    def forward_images(self, labeled: int, unlabeled: int) -> int:
        """The classifier's forward plus the detector's over (queue sample, x, u_w, u_s); with
        the shared encoder, only the images f does not already see: the queue sample (and x's
        strong view)."""
        r = self.cfg.rsmatch
        if r.shared_encoder:
            extra = 2 * labeled if r.strong_labeled else labeled
        else:
            extra = 2 * labeled + 2 * unlabeled
        return self.base.forward_images(labeled, unlabeled) + extra

    def classifier(self, model: RSMatchModel) -> Classifier:
        return model.classifier

    @torch.no_grad()
    def evaluate(self, ev: EvalContext) -> dict[str, float]:
        """Detector metrics on the unlabeled pool, queue purity, and the collapse warning.

        From the live detector, the one that fills the queue and routes samples. The EMA
        detector's copied BatchNorm statistics do not fit its lagging averaged weights
        (measured: 50% vs 77% pool accuracy on one 500-step run).
        """
        prov = ev.data.provenance
        results = evaluate.detector_metrics(ev.predict(ev.live.detect, ev.data.unlabeled), prov)
        labeled = ev.predict(ev.live.detect, ev.data.labeled)
        results["labeled_called_synthetic"] = float(labeled.float().mean())
        purity = evaluate.queue_purity(self.queue.held_sources(), prov)
        if purity is not None:
            results["queue_purity"] = purity
        warning = evaluate.collapse_warning(
            results["detector_called_synthetic"], results["labeled_called_synthetic"]
        )
        if warning:
            ev.warn(warning)
        return results

    def export(
        self, ema: nn.Module, live: nn.Module, out: Path, class_names: list[str],
        metrics: dict[str, float],
    ) -> None:  # fmt: skip
        """The EMA classifier (`out/model`) and the live detector (`out/detector`), the one
        `metrics` (from `evaluate`) measure. The shared-encoder ablation has no detector of its
        own: nothing."""
        from rsmatch.export import export_detector

        super().export(ema, live, out, class_names, metrics)
        if live.detector is None:
            return
        d, r, t = self.cfg.data, self.cfg.rsmatch, self.cfg.train
        real_set = d.benchmark or d.real
        training = {
            "real set (labeled + unlabeled)": f"`{real_set}`",
            "unlabeled pool generators": "see the benchmark"
            if d.benchmark
            else ", ".join(sorted(d.synthetic)) or "none",
            "synthetic labels used": "none",
            "labeled images": self.info.num_labeled,
            "unlabeled pool": self.info.num_unlabeled,
            "steps (train.steps)": t.steps,
            "RSMatch base": r.base,
            "detector pseudo-label tau": r.detector_threshold,
            "queue (L, M, k)": f"{r.queue_length}, {r.queue_picks}, {r.queue_topk}",
            "seed": t.seed,
        }
        export_detector(live.detector, out / "detector", d.mean, d.std,
                        list(self.info.image_shape[1:]), class_names, real_set, training,
                        metrics)  # fmt: skip

    def probe_metrics(
        self, probes: dict[str, torch.Tensor], idx_ulb: torch.Tensor, provenance: Provenance
    ) -> dict[str, torch.Tensor]:
        acc = evaluate.batch_detector_acc(probes["synthetic_pred"], idx_ulb, provenance)
        return {"batch_detector_acc": acc}
