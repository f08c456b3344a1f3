"""Prompts (T5 word-to-sentence or a template) and text-to-image generation with diffusers.

Generated images are written as class folders, `OUT/<generator>/<class>/<class>_<i>.jpg`, plus
`prompts.jsonl` (file -> prompt): that folder is a synthetic source like any other, generation
resumes by skipping files already written, and several processes split the work through
Accelerate. Each image's seed depends only on (seed, generator, class, index), so the result is
the same however the work is split or resumed.

Generators (docs/method.md section 1). GLIDE has no diffusers pipeline and no PyPI package; its
stand-in is latent diffusion `CompVis/ldm-text2im-large-256` (LDMTextToImagePipeline), a
text-to-image diffusion model of the same generation (Dec 2021), loaded like any pipeline.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from rsmatch.benchmark.errors import ModelLoadError
from rsmatch.benchmark.options import DEFAULT_PROMPT_MODEL, GENERATORS, GeneratorSpec

if TYPE_CHECKING:  # diffusers is an optional extra, imported when a pipeline is loaded
    from diffusers import DiffusionPipeline

TEMPLATE = "a photo of a {}"
T = TypeVar("T")


def _loaded(what: str, loader: Callable[[], T], instead: str) -> T:
    """`loader()`, its failure as one ModelLoadError naming `what` and the option that takes a
    local copy (`instead`): the Hub's and diffusers' errors come in many types, with the id far
    down a long traceback, and their advice is for the Python API."""
    try:
        return loader()
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        if len(first) > 200:  # cut at a word, not inside one
            first = first[:200].rsplit(" ", 1)[0] + " ..."
        raise ModelLoadError(
            f"{what}: cannot load ({type(e).__name__}: {first}); offline, download it where the "
            f"Hub is reachable and pass {instead}"
        ) from None


def resolve_generators(names: list[str], models: dict[str, str]) -> dict[str, GeneratorSpec]:
    """Specs for the named generators; `models` swaps a generator's weights (e.g. local copies)."""
    unknown = sorted(set(names) - set(GENERATORS))
    if unknown:
        raise ValueError(f"--generate: unknown generators {unknown} (known: {sorted(GENERATORS)})")
    bad = sorted(set(models) - set(names))
    if bad:
        raise ValueError(f"--generator-model: {bad} are not among the generated {names}")
    return {n: replace(GENERATORS[n], model=models.get(n, GENERATORS[n].model)) for n in names}


# --- prompts -------------------------------------------------------------------------------


def template_prompts(class_names: list[str], per_class: int) -> dict[str, list[str]]:
    return {c: [TEMPLATE.format(c.replace("_", " "))] * per_class for c in class_names}


def t5_prompts(
    class_names: list[str], per_class: int, model_id: str = DEFAULT_PROMPT_MODEL, seed: int = 0,
    samples: int | None = None, device: str = "cpu",
) -> dict[str, list[str]]:  # fmt: skip
    """He et al. 2022: the class name as the keyword, sampled generation, de-duplicated.

    Draws `samples` (default 1.25 x per_class) sentences per class, keeps the first `per_class`
    distinct ones and tops up with the template when too few are distinct.
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    what = f"--prompt-model {model_id}"
    instead = "--prompt-model FOLDER (or --prompts template)"
    tok = _loaded(what, lambda: AutoTokenizer.from_pretrained(model_id), instead)
    model = _loaded(what, lambda: AutoModelForSeq2SeqLM.from_pretrained(model_id), instead)
    model = model.to(device).eval()
    samples = samples or max(per_class, round(1.25 * per_class))
    out = {}
    for c, name in enumerate(class_names):
        torch.manual_seed(int(np.random.SeedSequence([seed, c]).generate_state(1)[0]))
        inputs = tok([name.replace("_", " ")], return_tensors="pt").to(device)
        with torch.no_grad():
            ids = model.generate(
                **inputs, do_sample=True, max_new_tokens=32, num_return_sequences=samples
            )
        unique = list(
            dict.fromkeys(
                s.strip() for s in tok.batch_decode(ids, skip_special_tokens=True) if s.strip()
            )
        )
        fill = [TEMPLATE.format(name.replace("_", " "))] * max(0, per_class - len(unique))
        out[name] = (unique + fill)[:per_class]
    return out


# --- generation ----------------------------------------------------------------------------


def load_pipeline(spec: GeneratorSpec, dtype: torch.dtype, device: str) -> DiffusionPipeline:
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    pipe = _loaded(
        f"generator model {spec.model}",
        lambda: DiffusionPipeline.from_pretrained(spec.model, dtype=dtype),
        "--generator-model GEN=FOLDER",
    )
    if spec.kind == "sdxl_lightning":  # the 4-step UNet and the trailing Euler scheduler
        from safetensors.torch import load_file

        if Path(spec.unet).is_file():
            weights = spec.unet
        else:
            from huggingface_hub import hf_hub_download

            owner, repo, filename = spec.unet.split("/", 2)
            weights = _loaded(
                f"--lightning-unet {spec.unet}",
                lambda: hf_hub_download(f"{owner}/{repo}", filename),
                "--lightning-unet FILE",
            )
        pipe.unet.load_state_dict(load_file(weights))
        pipe.scheduler = EulerDiscreteScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def to_stored_bytes(image: Image.Image, size: int, jpeg_quality: int) -> bytes:
    """Antialiased resize to the real set's size, then the real set's encoding."""
    image = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if jpeg_quality:  # PIL's JPEG at quality <= 75 uses 4:2:0 chroma, like the CIFAR JPEGs
        image.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Job:
    class_name: str
    index: int
    prompt: str
    seed: int
    path: Path


def plan_jobs(
    out: Path, generator: str, prompts: dict[str, list[str]], per_class: int, seed: int, suffix: str
) -> list[Job]:
    """Each image's file, prompt and seed; the seed is a function of (seed, generator name,
    class, index), so a generator's images do not depend on which others a build names."""
    key = zlib.crc32(generator.encode())
    jobs = []
    for c, (name, class_prompts) in enumerate(prompts.items()):
        for i in range(per_class):
            s = int(np.random.SeedSequence([seed, key, c, i]).generate_state(1)[0])
            jobs.append(
                Job(
                    name,
                    i,
                    class_prompts[i % len(class_prompts)],
                    s,
                    out / name / f"{name}_{i:05d}{suffix}",
                )
            )
    return jobs


def _batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for i in range(0, len(jobs), size):
        yield jobs[i : i + size]


def generate(
    spec: GeneratorSpec, jobs: list[Job], size: int, batch_size: int, jpeg_quality: int,
    dtype: torch.dtype, device: str, desc: str, show_progress: bool = True,
) -> int:  # fmt: skip
    """Generate the jobs whose files are missing; returns how many were made."""
    todo = [j for j in jobs if not j.path.is_file()]
    if not todo:
        return 0
    pipe = load_pipeline(spec, dtype, device)
    bar = tqdm(total=len(todo), desc=desc, disable=not show_progress)
    for batch in _batches(todo, batch_size):
        generators = [torch.Generator(device).manual_seed(j.seed) for j in batch]
        kwargs = {
            "num_inference_steps": spec.steps,
            "guidance_scale": spec.guidance,
            "generator": generators,
        }
        if spec.resolution:
            kwargs.update(height=spec.resolution, width=spec.resolution)
        images = pipe([j.prompt for j in batch], **kwargs).images
        for job, image in zip(batch, images):
            job.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = job.path.with_name(f".{job.path.name}.tmp")
            tmp.write_bytes(to_stored_bytes(image, size, jpeg_quality))
            tmp.replace(job.path)  # a file exists only once complete: resume can trust it
        bar.update(len(batch))
    bar.close()
    return len(todo)


def write_prompt_index(out: Path, jobs: list[Job]) -> None:
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as f:
        for j in jobs:
            f.write(
                json.dumps(
                    {"file": f"{j.class_name}/{j.path.name}", "prompt": j.prompt, "seed": j.seed}
                )
                + "\n"
            )
