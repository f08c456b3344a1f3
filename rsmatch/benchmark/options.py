"""What `rsmatch-build-benchmark` can be asked for: its options and the generators it knows.
Nothing heavy is imported here, so the command line's `--help` needs no torch or datasets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PROMPT_MODEL = "mrm8488/t5-base-finetuned-common_gen"  # He et al. 2022


@dataclass(frozen=True)
class GeneratorSpec:
    model: str  # Hub id or local folder of a saved pipeline
    steps: int
    guidance: float
    resolution: int  # native output size
    kind: str = "auto"  # auto: DiffusionPipeline.from_pretrained; sdxl_lightning: swap UNet
    unet: str | None = None  # "repo/file.safetensors" or a local file (sdxl_lightning)


GENERATORS = {
    "sd14": GeneratorSpec("CompVis/stable-diffusion-v1-4", 50, 7.5, 512),
    "sdxl_lightning": GeneratorSpec(
        "stabilityai/stable-diffusion-xl-base-1.0",
        4,
        0.0,
        1024,
        kind="sdxl_lightning",
        unet="ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors",
    ),  # fmt: skip
    "glide": GeneratorSpec("CompVis/ldm-text2im-large-256", 50, 6.0, 256),
}


@dataclass
class BuildOptions:
    """What `rsmatch-build-benchmark` takes; its flags are these names with dashes."""

    real: str | None = None
    synthetic: list[str] = field(default_factory=list)  # NAME=[cifake:]FOLDER
    generate: list[str] = field(default_factory=list)
    generator_model: list[str] = field(default_factory=list)  # GEN=PATH_OR_ID
    lightning_unet: str | None = None
    images_per_class: int = 0  # 0: what the ratio needs
    prompts: str = "t5"
    prompt_model: str = DEFAULT_PROMPT_MODEL
    prompts_per_class: int = 200
    batch_size: int = 8
    dtype: str = "float16"
    device: str | None = None
    resolution: int = 0
    jpeg_quality: int = -1  # -1: 75 if the real set is JPEG, else PNG (0)
    export_synthetic: Path | None = None
    labels_per_class: int = 25
    unlabeled_per_class: int | None = None
    replace_ratio: float = 0.5
    seed: int = 0
    skip_corrupt: bool = False
    out: Path | None = None
    push_to_hub: str | None = None
    private: bool = False
    command: list[str] = field(default_factory=list)  # recorded in the card
