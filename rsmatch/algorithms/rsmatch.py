"""RSMatch (RSMATCH.md section 3) on top of any SSL base algorithm's pseudo-labels and masks.

Model: one container with the classifier (encoder f, real head h_r, fake head h_f) and the
deepfake detector (encoder g, binary head d), so DDP, DeepSpeed, EMA and checkpoints see one
model with one optimizer. Each step does one forward of the container:
    classifier on cat(x_lb, u_w, u_s)      detector on cat(x_lb, queue sample, u_w, u_s)
With `shared_encoder` (ablation "w/o ind. models") the detector head d sits on f instead, and
the queue sample rides along in the classifier's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rsmatch.algorithms.base import (
    Algorithm,
    SSLAlgorithm,
    StepContext,
    StepOutput,
    cross_entropy,
    portable,
)
from rsmatch.config import Config
from rsmatch.csqueue import CSQueue
from rsmatch.data.loaders import Batch
from rsmatch.models import Classifier, Detector, linear_head

REAL, SYNTHETIC = 0, 1


class RSMatchModel(nn.Module):
    """Classifier + detector. forward(classifier_images, detector_images)."""

    def __init__(self, classifier: Classifier, detector: Detector | None) -> None:
        super().__init__()
        self.classifier = classifier
        self.detector = detector
        # Ablation "w/o ind. models": the binary head on the classifier's features.
        self.shared_head = (
            linear_head(classifier.encoder.num_features, 2) if detector is None else None
        )

    def forward(
        self, x_cls: torch.Tensor, x_det: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.detector is not None:
            return self.classifier(x_cls), self.detector(x_det)
        out = self.classifier(torch.cat([x_cls, x_det]))
        n = len(x_cls)
        return {k: v[:n] for k, v in out.items()}, self.shared_head(out["feat"][n:])

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Detector logits for evaluation."""
        if self.detector is not None:
            return self.detector(x)
        return self.shared_head(self.classifier(x)["feat"])


class RSMatch(Algorithm):
    name = "rsmatch"

    def __init__(self, cfg: Config, num_classes: int, num_labeled: int, num_unlabeled: int,
                 base: SSLAlgorithm, image_shape: tuple[int, ...]) -> None:  # fmt: skip
        super().__init__(cfg, num_classes, num_labeled, num_unlabeled)
        r = cfg.rsmatch
        self.base = base
        self.queue = CSQueue(
            num_classes, r.queue_length, r.queue_picks, r.queue_topk, image_shape, r.class_wise
        )

    def build_model(self) -> RSMatchModel:
        r, d = self.cfg.rsmatch, self.cfg.data
        classifier = self.base.build_model(fake_head=r.fake_head)
        detector = (
            None
            if r.shared_encoder
            else Detector(r.detector_backbone, d.mean, d.std, self.cfg.model.bn_momentum)
        )
        return RSMatchModel(classifier, detector)

    def step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> StepOutput:
        r = self.cfg.rsmatch
        b, u = len(batch.x_lb), len(batch.u_w)
        # B items from the queue: drawn globally with the step's generator, this rank's slice.
        global_b = b * ctx.world
        queued = self.queue.sample(global_b, ctx.generator)[ctx.rank * b : (ctx.rank + 1) * b]
        queued = queued.to(batch.x_lb.device)
        x_lb_det = batch.x_lb_s if r.strong_labeled else batch.x_lb
        x_cls = torch.cat([batch.x_lb, batch.u_w, batch.u_s])
        x_det = torch.cat([x_lb_det, queued, batch.u_w, batch.u_s])
        cls_out, det_logits = model(x_cls, x_det)
        views = self.base.split(cls_out, b, u)
        det_lb, det_q, det_w, det_s = det_logits.split([b, len(queued), u, u])

        # Base SSL pseudo-labels: yhat_j and the confidence mask m_j (FixMatch: max p_r >= tau).
        pl = self.base.pseudo_labels(views, batch, ctx)
        yhat = views.w["logits"].detach().argmax(-1)

        # (1) synthetic score s_j on the weak view; detector pseudo-labels zhat_j.
        p_d = det_w.detach().float().softmax(-1)
        score = p_d[:, SYNTHETIC]
        det_conf, zhat = p_d.max(-1)

        # (2) detector, supervised: labeled reals are real, queued items synthetic.
        loss_ds = F.cross_entropy(det_lb, torch.full_like(batch.y_lb, REAL))
        if len(queued):
            loss_ds = loss_ds + F.cross_entropy(
                det_q, torch.full((len(queued),), SYNTHETIC, device=det_q.device)
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
            **({f"queue_fill/{c}": f for c, f in enumerate(fill)} if self.queue.class_wise else {}),
            **pl.metrics,
        }
        probes = {"synthetic_pred": zhat, "synthetic_score": score}
        return StepOutput(losses, {k: v.detach() for k, v in metrics.items()}, probes)

    # -- state: the base's and the queue's ----------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **portable(self.base.state_dict(), "base."),
            **portable(self.queue.state_dict(), "queue."),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.base.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("base.")})
        self.queue.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("queue.")})

    def to(self, device: torch.device) -> RSMatch:
        self.base.to(device)
        self.queue.to(device)
        return self
